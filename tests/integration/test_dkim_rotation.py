"""The dkim-rotation runbook end to end (issue 14): new selectors, the customer's DNS checked
until it shows them (Knot), the checkpoint answered by the CLI, the running relay signing with
the new keys within its key cache time (no restart), the old keys still published and still
verifying during the overlap, then retired — every signature checked by mailauth (Node)."""

from __future__ import annotations

import json
import re
import time

import pytest
from prefect.deployments import run_deployment
from sqlmodel import select

from models import AuditEntry, DkimKey, KeyState, Procedure, ProcedureState
from models.db import session_scope
from protocol import domains
from testbed.axiom import RelayProcess
from testbed.axiom import Tenant as Creds
from tests.integration.test_dkim_independent import node_verify, spooled_bytes, submit
from tests.integration.test_domain_onboarding import DOMAIN, _until, world  # noqa: F401

pytestmark = pytest.mark.integration

MESSAGE = (
    f"From: Shop <orders@{DOMAIN}>\r\nTo: <c@example.net>\r\nSubject: Order {{n}}\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nThanks.\r\n"
)


def _rotation(engine) -> Procedure | None:
    with session_scope(engine) as s:
        return s.exec(select(Procedure).where(Procedure.name == "dkim-rotation")).first()


def _waiting_for(engine, text: str):
    def check():
        row = _rotation(engine)
        ok = row and row.state == ProcedureState.WAITING and text in (row.waiting_for or "")
        return row if ok else None

    return check


def _selectors(engine, *states: KeyState) -> set[str]:
    with session_scope(engine) as s:
        return set(s.exec(select(DkimKey.selector).where(DkimKey.state.in_(states))).all())


def _published(cli) -> dict[str, str]:
    records = json.loads(cli("domain", "records", DOMAIN, "--json").stdout)
    return {r["name"]: r["value"] for r in records if r["kind"] == "dkim"}


def _signed_by(db_url: str, relay, creds, n: int) -> tuple[bytes, set[str]]:
    queue_id = submit(relay, creds, MESSAGE.format(n=n).encode())
    spooled = spooled_bytes(db_url, queue_id)
    headers = spooled.split(b"\r\n\r\n", 1)[0].decode()
    return spooled, set(re.findall(r"\bs=([a-z0-9]+);", headers))


def test_a_rotation_switches_signing_without_restart_and_keeps_old_keys_through_the_overlap(
    world,  # noqa: F811
):
    engine, cli, publish = world["engine"], world["cli"], world["publish"]
    with session_scope(engine) as s:
        domains.add_domain(s, world["home"].keybox, "acme", DOMAIN)
        domains.mark_domain_active(s, DOMAIN, "tests", "fixture")
        s.commit()
    old = _selectors(engine, KeyState.active)
    everything = ("spf", "dmarc", "dkim", "return_path_mx", "return_path_spf")
    publish(*everything)
    relay = RelayProcess(
        world["home"], extra_env=world["env"] | {"AXIOM_POLICY_CACHE_SECONDS": "0.5"}
    ).start()  # keys re-read every 6 s
    world["started"].append(relay)
    creds = Creds("acme", DOMAIN, "acme-app", world["password"])
    before, signed = _signed_by(world["home"].db_url, relay, creds, 1)
    assert signed == old

    world["serve"]()
    run_deployment("dkim-rotation/on-demand", parameters={"domain": DOMAIN}, timeout=0)
    _until("waiting for DNS", _waiting_for(engine, f"DNS of {DOMAIN}'s new keys"))
    new = _selectors(engine, KeyState.pending)
    # a second key on the same day gets the next counter: never a selector used before
    assert len(new) == 2 and not new & old
    assert {s[:-1] for s in new} == {s[:-1] for s in old}  # same date, counter 1 → 2
    with session_scope(engine) as s:
        assert len(s.exec(select(DkimKey)).all()) == 4

    publish(*everything)  # the customer publishes the new keys beside the old ones
    cli("sandbox", "clock", "advance", "61m")
    cli("procedures", "sweep", "--json")
    asking = _until("waiting for approval", _waiting_for(engine, "approval #"))
    cli("approve", str(asking.approval_id), "--as", "carol")
    _until("waiting out the overlap", _waiting_for(engine, "overlap"))
    assert _selectors(engine, KeyState.active) == new
    assert _selectors(engine, KeyState.retiring) == old

    # The running relay signs with the new keys within its key cache time: no restart.
    deadline = time.monotonic() + 30
    n = 2
    while True:
        after, signed = _signed_by(world["home"].db_url, relay, creds, n)
        if signed == new or time.monotonic() > deadline:
            break
        n += 1
        time.sleep(1)
    assert signed == new
    # During the overlap both key sets are published: old and new mail both verify.
    records = _published(cli)
    assert {name.split(".")[0] for name in records} == old | new
    workdir = world["home"].path / "verify"
    workdir.mkdir(exist_ok=True)
    for message, selectors in ((before, old), (after, new)):
        verdict = node_verify(message, records, workdir)
        assert {(s["selector"], s["result"]) for s in verdict["signatures"]} == {
            (selector, "pass") for selector in selectors
        }

    # After the overlap the old keys are retired and no longer asked of the customer.
    cli("sandbox", "clock", "advance", "8d")
    cli("procedures", "sweep", "--json")
    done = _until(
        "finished",
        lambda: (row := _rotation(engine)) and row.state == ProcedureState.FINISHED and row,
    )
    assert done.outcome["outcome"] == "rotated" and set(done.outcome["retired"]) == old
    assert _selectors(engine, KeyState.retired) == old
    assert {name.split(".")[0] for name in _published(cli)} == new
    with session_scope(engine) as s:
        actions = [
            e.action
            for e in s.exec(select(AuditEntry).order_by(AuditEntry.id)).all()
            if e.action.startswith("dkim.")
        ]
    assert actions == ["dkim.rotation.begin", "dkim.switch", "dkim.retire"]
