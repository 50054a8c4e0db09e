"""The operator verbs against a real `axiom relay` on loopback: lifting a hold, a pause or a
suspension sends the mail that waited within seconds, not at its old next-attempt time (5
minutes, or the suspension's expiry); a paused tenant's MAIL FROM gets 451 4.7.1."""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select
from sqlmodel import Session

from flows.suspend_stream import hold_stream, read_stream
from models import Message, Recipient, RecipientState, Suspension
from models.audit import as_utc
from models.db import session_scope
from protocol import domains, operators, tenants
from relay.spool.claims import TENANT_PAUSED_WAIT
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from testbed.axiom import RelayProcess
from testbed.dns import knot  # noqa: F401  (fixture)
from tests.integration.delivery_world import make_world

pytestmark = pytest.mark.integration

# Woken mail falls due 2.5 s after the change; the relay polls every second.
RELEASED_WITHIN = 12.0


@pytest.fixture
def setup(axiom_home, engine, knot):  # noqa: F811
    world = make_world(engine, knot, pools={"default": ["127.0.0.10"]})
    world.sink("gmail.com")
    with session_scope(engine) as s:
        password = tenants.add_credential(s, "acme", "acme-app")
        domains.add_domain(s, axiom_home.keybox, "acme", "acme.example")
        domains.mark_domain_active(s, "acme.example", "tests", "fixture")
        operators.add_operator(s, "alice", ["deliverability"], None)
        s.commit()
    relay = RelayProcess(
        axiom_home,
        {
            "AXIOM_DNS_NAMESERVERS": world.knot.nameserver,
            "AXIOM_DELIVERY_PORT": str(world.port),
        },
    ).start()
    yield {"home": axiom_home, "engine": engine, "world": world, "relay": relay, "pw": password}
    relay.stop()
    world.stop()


def _client(setup) -> smtplib.SMTP:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    client = smtplib.SMTP(*setup["relay"].submission, timeout=10)
    client.starttls(context=ctx)
    client.login("acme-app", setup["pw"])
    return client


def _submit(setup, rcpt: str) -> None:
    with _client(setup) as client:
        client.sendmail(
            "shop@acme.example",
            [rcpt],
            f"From: shop@acme.example\r\nTo: {rcpt}\r\nSubject: order\r\n\r\nShipped.\r\n",
        )


def _recipient(engine, address: str) -> Recipient:
    with Session(engine) as s:
        return s.scalars(select(Recipient).where(Recipient.address == address)).one()


def _wait(what, predicate, timeout: float, setup) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, (
            f"{what} not within {timeout}s:\n{setup['relay'].output()[-3000:]}"
        )
        time.sleep(0.2)
    return time.monotonic() - started


def _postponed(engine, address: str, reason: str):
    def check() -> bool:
        r = _recipient(engine, address)
        return (
            r.state == RecipientState.queued
            and (r.last_reply or "").startswith(reason)
            and as_utc(r.next_attempt_at) > datetime.now(UTC) + timedelta(minutes=1)
        )

    return check


def _delivered(engine, address: str):
    return lambda: _recipient(engine, address).state == RecipientState.delivered


def test_a_held_stream_released_by_an_operator_delivers_within_seconds(setup):
    engine, home = setup["engine"], setup["home"]
    with session_scope(engine) as s:
        state = read_stream(s, "acme", "transactional")
        hold_stream(s, state, 1, "alice", "traps", actor="flow:test")
        s.commit()
    _submit(setup, "held@gmail.com")
    _wait(
        "postponed by the hold",
        _postponed(engine, "held@gmail.com", "waiting: pool hold"),
        20,
        setup,
    )
    assert _recipient(engine, "held@gmail.com").attempts == 0

    out = home.cli(
        "stream", "release", "acme", "transactional", "--as", "alice", "--reason", "clean"
    )
    assert "sends from pool default" in out.stdout and "1 waiting recipient(s) woken" in out.stdout
    took = _wait(
        "delivery after release", _delivered(engine, "held@gmail.com"), RELEASED_WITHIN, setup
    )
    assert took < RELEASED_WITHIN


def test_a_paused_tenant_gets_451_its_queued_mail_waits_and_resume_sends_it(setup):
    engine, home = setup["engine"], setup["home"]
    home.cli("tenant", "pause", "acme", "--as", "alice", "--reason", "complaint spike")
    # Mail already in the spool when the pause came.
    queue_id = new_queue_id()
    entry = SpoolEntry(
        queue_id,
        _tenant_id(engine),
        "transactional",
        "shop@acme.example",
        ["queued@gmail.com"],
        "acme.example",
        f"<{queue_id}@acme.example>",
        b"From: shop@acme.example\r\nTo: queued@gmail.com\r\nSubject: x\r\n\r\nx\r\n",
        "127.0.0.1",
        "acme-app",
        created_at=datetime.now(UTC),
    )
    messages, rows = spool_rows([entry])
    with engine.begin() as conn:
        conn.execute(insert(Message), messages)
        conn.execute(insert(Recipient), rows)
    _wait(
        "postponed by the pause",
        _postponed(engine, "queued@gmail.com", TENANT_PAUSED_WAIT),
        20,
        setup,
    )
    assert _recipient(engine, "queued@gmail.com").attempts == 0
    listing = json.loads(home.cli("queue", "--json").stdout)
    assert any(TENANT_PAUSED_WAIT in json.dumps(row) for row in listing)

    # New submissions: 451 at MAIL FROM once the policy cache (5 s) has seen the pause.
    def refused() -> bool:
        with _client(setup) as client:
            code, text = client.mail("shop@acme.example")
            if code == 250:
                client.rset()
                return False
            assert (code, text.decode()) == (
                451,
                "4.7.1 Sending for this account is paused by the operator; try again later",
            )
            return True

    _wait("451 at MAIL FROM", refused, 10, setup)

    out = home.cli("tenant", "resume", "acme", "--as", "alice", "--reason", "explained")
    assert "1 waiting recipient(s) woken" in out.stdout
    _wait("delivery after resume", _delivered(engine, "queued@gmail.com"), RELEASED_WITHIN, setup)

    def accepted() -> bool:
        with _client(setup) as client:
            code, _ = client.mail("shop@acme.example")
            client.rset()
            return code == 250

    _wait("MAIL accepted again", accepted, 10, setup)
    _submit(setup, "after@gmail.com")
    _wait("new mail delivered", _delivered(engine, "after@gmail.com"), 20, setup)


def test_a_lifted_suspension_delivers_at_once_not_at_its_expiry(setup):
    engine, home = setup["engine"], setup["home"]
    with session_scope(engine) as s:
        row = Suspension(
            source_ip="127.0.0.10",
            provider="google",
            action="suspend",
            reason="421 storm",
            rule_id="tests",
            expires_at=datetime.now(UTC) + timedelta(hours=2),
        )
        s.add(row)
        s.commit()
        suspension_id = row.id
    _submit(setup, "suspended@gmail.com")
    _wait(
        "postponed by the suspension",
        _postponed(engine, "suspended@gmail.com", "waiting: 127.0.0.10 suspended for google"),
        20,
        setup,
    )
    assert as_utc(_recipient(engine, "suspended@gmail.com").next_attempt_at) > datetime.now(
        UTC
    ) + timedelta(hours=1)
    out = home.cli(
        "suspension", "lift", str(suspension_id), "--as", "alice", "--reason", "receiver fixed"
    )
    assert "1 waiting recipient(s) woken" in out.stdout
    _wait("delivery after lift", _delivered(engine, "suspended@gmail.com"), RELEASED_WITHIN, setup)


def test_an_operator_without_the_role_cannot_lift_and_is_audited(setup):
    home = setup["home"]
    refused = home.cli(
        "tenant", "pause", "acme", "--as", "mallory", "--reason", "x y z", check=False
    )
    assert refused.returncode == 1
    assert "refused: mallory is not a registered operator" in refused.stderr
    entries = json.loads(home.cli("audit", "--json").stdout)
    assert any(e["action"] == "tenant.pause.refused" for e in entries)


def _tenant_id(engine) -> int:
    from models import Tenant

    with Session(engine) as s:
        return s.scalars(select(Tenant.id).where(Tenant.name == "acme")).one()
