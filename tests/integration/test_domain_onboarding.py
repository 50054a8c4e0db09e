"""The domain-onboarding runbook end to end (issue 14): a real Prefect server, `axiom flows
serve`, Knot on loopback as the customer's DNS, the checkpoint answered by the CLI and in the
fake Slack, the control plane killed while the procedure waits for DNS.

The customer's zone is edited step by step as a customer would publish it: the flow checks,
reports what is missing, sleeps (holding no process) until the next check on the sandbox
clock, and goes on when everything is right. Activated, a message from the domain is accepted,
signed with the domain's new keys and verified by mailauth (Node), not by dkimpy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prefect.deployments import run_deployment
from sqlmodel import select

from config.settings import load_settings
from models import (
    AuditEntry,
    DkimKey,
    Domain,
    DomainState,
    IpAddress,
    IpPool,
    IpState,
    KeyState,
    Message,
    PoolKind,
    Procedure,
    ProcedureState,
    Stream,
    WarmupPlan,
)
from models.db import make_engine, session_scope
from notifications import customer_mail
from protocol import operators, tenants
from testbed.axiom import ControlProcess, FlowsProcess, RelayProcess, flow_run_processes, make_home
from testbed.dns import KnotServer
from tests.fakes.slack import FakeSlack, button_click, sign
from tests.integration.test_dkim_independent import node_verify, spooled_bytes, submit

pytestmark = pytest.mark.integration

RELAY = "relay.axiom.test"
DOMAIN = "shop.test"
REVERSE = "0.0.127.in-addr.arpa"
# What we publish ourselves: the relay's name and address (FCrDNS of the default pool's
# 127.0.0.1), SPF for our IPs, the MX of the return path's target, and the authorisation to
# receive any domain's DMARC reports (RFC 7489 7.1). One zone, `test.`, holds every name.
OURS = [
    (f"{RELAY}.", "A", "127.0.0.1"),
    (f"{RELAY}.", "MX", f"10 {RELAY}."),
    (f"_spf.{RELAY}.", "TXT", "v=spf1 ip4:127.0.0.0/24 -all"),
    (f"*._report._dmarc.{RELAY}.", "TXT", "v=DMARC1"),
]
PTRS = [("1", "PTR", f"{RELAY}.")]
SECRET = "8f14e45fceea167a5a36dedd4bea2543"


@pytest.fixture
def world(prefect, tmp_path) -> Iterator[dict]:
    """Knot serving only our own names, a sandbox home whose resolver is Knot, tenant acme
    (Italian, with a contact), operators bob (lead, on Slack) and carol (deliverability)."""
    with KnotServer({"test": OURS, REVERSE: PTRS}) as knot:
        home = make_home(tmp_path / "home", f"sqlite:///{tmp_path / 'axiom.db'}", hostname=RELAY)
        engine = make_engine(home.db_url)
        with session_scope(engine) as s:
            tenants.add_tenant(s, "acme")
            password = tenants.add_credential(s, "acme", "acme-app")
            operators.add_operator(s, "bob", ["lead"], "U0BOB")
            operators.add_operator(s, "carol", ["deliverability"], None)
            s.commit()
        env = {
            "AXIOM_DNS_NAMESERVERS": knot.nameserver,
            "AXIOM_HOSTNAME": RELAY,
            "AXIOM_PREFECT_API_URL": prefect.api_url,
        }
        started: list = []

        def serve(**extra: str) -> FlowsProcess:
            process = FlowsProcess(home, prefect.env, **env, **extra).start()
            started.append(process)
            return process

        def cli(*args: str, check: bool = True):
            return home.cli(*args, check=check, extra_env=env)

        def publish(*kinds: str, change: Callable[[list], list] | None = None) -> None:
            """The customer's zone: our names plus their records of these kinds."""
            records = json.loads(cli("domain", "records", DOMAIN, "--json").stdout)
            theirs = [
                (f"{r['name']}.", r["type"], r["value"]) for r in records if r["kind"] in kinds
            ]
            knot.set_zone("test", OURS + (change(theirs) if change else theirs))

        yield {
            "home": home,
            "engine": engine,
            "knot": knot,
            "serve": serve,
            "cli": cli,
            "env": env,
            "publish": publish,
            "password": password,
            "started": started,
        }
        for process in started:
            if process.running:
                if isinstance(process, FlowsProcess):
                    process.kill_all()
                else:
                    process.stop()
        engine.dispose()


def _until(what: str, check: Callable[[], object], timeout: float = 120, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout}s")


def _procedure(engine) -> Procedure | None:
    with session_scope(engine) as s:
        return s.exec(select(Procedure).where(Procedure.name == "domain-onboarding")).first()


def _steps(engine) -> set[str]:
    from models import ProcedureStep

    row = _procedure(engine)
    if row is None:
        return set()
    with session_scope(engine) as s:
        return set(
            s.exec(select(ProcedureStep.step).where(ProcedureStep.procedure_id == row.id)).all()
        )


def _waiting_for(engine, text: str):
    def check():
        row = _procedure(engine)
        ok = row and row.state == ProcedureState.WAITING and text in (row.waiting_for or "")
        return row if ok else None

    return check


def _finished(engine):
    def check():
        row = _procedure(engine)
        return row if row and row.state == ProcedureState.FINISHED else None

    return check


def _checks(engine) -> dict[str, bool]:
    with session_scope(engine) as s:
        domain = s.exec(select(Domain).where(Domain.name == DOMAIN)).one()
        return {c["name"]: c["ok"] for c in domain.dns_checks.get("checks", [])}


def _audit(engine, action: str) -> list[AuditEntry]:
    with session_scope(engine) as s:
        return list(s.exec(select(AuditEntry).where(AuditEntry.action == action)).all())


def _onboard(**overrides) -> str:
    parameters = {
        "tenant": "acme",
        "domain": DOMAIN,
        "stream_kind": "transactional",
        "expected_per_day": 7_000,
        "expected_per_month": 150_000,
        "sending_days_per_week": 5,
        "list_source": "customers",
        "list_age_months": 2,
    } | overrides
    return str(run_deployment("domain-onboarding/on-demand", parameters=parameters, timeout=0).id)


def _next_check(world, n: int) -> None:
    """Move the sandbox clock past the recheck interval and sweep: check #n is made."""
    engine = world["engine"]
    world["cli"]("sandbox", "clock", "advance", "16m")
    # The served procedures-sweep/scheduled (every minute) may take it first: either way the
    # procedure is woken once, and the check is made.
    swept = json.loads(world["cli"]("procedures", "sweep", "--json").stdout)
    assert swept["resumed"] in ([], [_procedure(engine).id]), swept
    _until(f"check #{n} made", lambda: f"check#{n}" in _steps(engine))


def test_onboarding_waits_for_dns_through_a_restart_and_activates_on_the_cli_answer(world):
    engine, cli, publish = world["engine"], world["cli"], world["publish"]
    flows = world["serve"]()
    _onboard()
    waiting = _until("waiting for DNS", _waiting_for(engine, f"DNS of {DOMAIN}"))
    assert waiting.subject == f"domain:{DOMAIN}"
    _until("no process holding it", lambda: flow_run_processes(flows.pid) == [], timeout=60)
    # Nothing is published: every check of the customer's records fails, with its reason.
    first = _checks(engine)
    assert not first["spf.record"] and not first["dmarc.record"] and not first["return_path.mx"]
    assert [name for name, ok in first.items() if name.startswith("dkim:") and not ok] != []
    checked = cli("domain", "check", DOMAIN, "--json", check=False)
    assert checked.returncode == 1 and json.loads(checked.stdout)["passed"] is False
    shown = json.loads(cli("domain", "show", DOMAIN, "--json").stdout)
    assert (shown["state"], shown["dns"]["passed"]) == ("pending", False)
    assert [(p["name"], p["state"]) for p in shown["procedures"]] == [
        ("domain-onboarding", "waiting")
    ]
    assert {k["state"] for k in shown["keys"]} == {"pending"}

    # The customer publishes SPF and DMARC first: those now pass, DKIM and the return path not.
    publish("spf", "dmarc")
    _next_check(world, 2)
    second = _checks(engine)
    assert second["spf.record"] and second["spf.include"] and second["dmarc.record"]
    assert not second["return_path.mx"]
    assert not all(ok for name, ok in second.items() if name.startswith("dkim:"))
    _until("waiting again", _waiting_for(engine, f"DNS of {DOMAIN}"))

    # The control plane dies while the procedure waits; meanwhile the customer publishes the
    # rest and the next check falls due. Back, the sweep continues the procedure.
    _until("no process holding it", lambda: flow_run_processes(flows.pid) == [], timeout=60)
    flows.kill_all()
    publish("spf", "dmarc", "dkim", "return_path_mx", "return_path_spf")
    world["serve"]()
    _next_check(world, 3)
    asking = _until("waiting for approval", _waiting_for(engine, "approval #"))
    assert all(_checks(engine).values()), _checks(engine)

    # 150,000 a month on 5 days: the rule proposes a dedicated pool; the lead approves with
    # the other choice in the comment.
    approval_id = asking.approval_id
    refused = cli("approve", str(approval_id), "--as", "carol", check=False)
    assert refused.returncode != 0 and "carol" in refused.stderr + refused.stdout
    cli("approve", str(approval_id), "--as", "bob", "--comment", "start shared: pool=default")
    done = _until("finished", _finished(engine))
    outcome = done.outcome
    assert (outcome["outcome"], outcome["decided_by"]) == ("activated", "bob")
    assert outcome["proposal"]["pool"] == "dedicated-acme"  # what the rule proposed
    assert outcome["activation"]["pool"] == "default"  # what the approver chose
    with session_scope(engine) as s:
        domain = s.exec(select(Domain).where(Domain.name == DOMAIN)).one()
        assert domain.state == DomainState.active
        assert domain.return_path_published_at is not None  # bounces.shop.test in MAIL FROM
        keys = s.exec(select(DkimKey).where(DkimKey.domain_id == domain.id)).all()
        assert {k.state for k in keys} == {KeyState.active}
        stream = s.exec(select(Stream).where(Stream.name == "transactional")).one()
        assert s.get(IpPool, stream.pool_id).name == "default" and stream.fallback_pool_id is None
        assert (stream.kind, stream.declared_per_month, stream.sending_days_per_week) == (
            "transactional",
            150_000,
            5,
        )
        assert stream.list_source == "customers"
    shown = json.loads(cli("domain", "show", DOMAIN, "--json").stdout)
    assert (shown["state"], shown["dns"]["passed"], shown["procedures"]) == ("active", True, [])
    assert shown["streams"] == [
        {
            "stream": "transactional",
            "pool": "default",
            "kind": "transactional",
            "per_day": 7_000,
            "per_month": 150_000,
            "days_per_week": 5,
            "list_source": "customers",
            "list_age_months": 2,
        }
    ]
    assert "Streams of acme (declared)" in cli("domain", "show", DOMAIN).stdout
    (activated,) = _audit(engine, "domain.activate")
    assert activated.runbook_id == "domain-onboarding" and activated.actor.startswith("flow:")
    assert activated.evidence["approved_by"] == "bob"
    assert len(_audit(engine, "approval.requested")) == 1  # asked once, over two runners

    # A message from the domain is accepted and signed with its keys; mailauth verifies both.
    relay = RelayProcess(world["home"], extra_env=world["env"]).start()
    world["started"].append(relay)
    from testbed.axiom import Tenant as Creds

    creds = Creds("acme", DOMAIN, "acme-app", world["password"])
    message = (
        f"From: Shop <orders@{DOMAIN}>\r\nTo: <c@example.net>\r\nSubject: Order 7\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nThanks.\r\n"
    ).encode()
    queue_id = submit(relay, creds, message)
    records = {
        r["name"]: r["value"]
        for r in json.loads(cli("domain", "records", DOMAIN, "--json").stdout)
        if r["kind"] == "dkim"
    }
    verdict = node_verify(spooled_bytes(world["home"].db_url, queue_id), records, tmp_dir(world))
    assert sorted(s["result"] for s in verdict["signatures"]) == ["pass", "pass"]
    assert {f"{s['selector']}._domainkey.{DOMAIN}" for s in verdict["signatures"]} == set(records)


def tmp_dir(world):
    path = world["home"].path / "verify"
    path.mkdir(exist_ok=True)
    return path


def test_the_activation_answered_in_slack_binds_a_dedicated_pool_and_notes_its_cold_ips(
    world,
):
    """Everything is published before the run: the first check passes, the request is in
    Slack, the lead's click (signed) approves, and the proposed dedicated pool, which exists
    with a cold IP, is bound with the shared pool as fallback; the warm-up is noted."""
    engine, publish = world["engine"], world["publish"]
    with session_scope(engine) as s:
        pool = IpPool(name="dedicated-acme", kind=PoolKind.dedicated)
        s.add(pool)
        s.flush()
        s.add(IpAddress(address="127.0.0.2", pool_id=pool.id, state=IpState.cold))
        s.commit()
    slack = FakeSlack()
    slack_env = {
        "AXIOM_SLACK_BOT_TOKEN": slack.token,
        "AXIOM_SLACK_CHANNEL": "C0APPROVALS",
        "AXIOM_SLACK_API_URL": slack.base_url,
        "AXIOM_SLACK_SIGNING_SECRET": SECRET,
    }
    control = ControlProcess(world["home"], world["env"] | slack_env).start()
    try:
        # the domain exists before the run (added by hand): the run reuses its keys
        world["cli"]("domain", "add", "acme", DOMAIN)
        publish("spf", "dmarc", "dkim", "return_path_mx", "return_path_spf")
        world["serve"](**slack_env)
        _onboard()
        asking = _until("waiting for approval", _waiting_for(engine, "approval #"))
        (posted,) = slack.wait_for("chat.postMessage")
        text = json.dumps(posted.args)
        assert f"approval:{asking.approval_id}" in text and "dedicated-acme" in text
        assert "pool=default" in text  # the other choice, for the approver
        assert f"._domainkey.{DOMAIN} TXT" in text  # the records, from the same template

        body = button_click(asking.approval_id, "approve", "U0BOB")
        answer = httpx.post(
            f"{control.url}/slack/interactivity", content=body, headers=sign(SECRET, body)
        )
        assert answer.status_code == 200
        done = _until("finished", _finished(engine))
    finally:
        control.stop()
        slack.close()
    assert (done.outcome["outcome"], done.outcome["decided_by"]) == ("activated", "bob")
    with session_scope(engine) as s:
        stream = s.exec(select(Stream).where(Stream.name == "transactional")).one()
        assert s.get(IpPool, stream.pool_id).name == "dedicated-acme"
        assert s.get(IpPool, stream.fallback_pool_id).name == "default"
        keys = s.exec(select(DkimKey)).all()
        assert len(keys) == 2  # the keys `domain add` made, reused
    # the new domain warms on its own plan; the pool's cold IP waits for warmup.start
    (warmup,) = _audit(engine, "warmup.start")
    assert (warmup.subject, warmup.evidence["plan"]) == (f"domain:{DOMAIN}", "domain")
    assert done.outcome["activation"]["cold_ips"] == ["127.0.0.2"]
    with session_scope(engine) as s:
        plan = s.exec(select(WarmupPlan)).one()
        assert plan.domain_id is not None and plan.state == "running"
    asked = _until("warm-up asked", _warmup_start_waiting(engine))
    assert asked.parameters["ip"] == "127.0.0.2" and "approval #" in asked.waiting_for


def _warmup_start_waiting(engine):
    def check():
        with session_scope(engine) as s:
            row = s.exec(
                select(Procedure).where(
                    Procedure.name == "ip-warmup", Procedure.subject == "ip:127.0.0.2/warmup-start"
                )
            ).first()
        return row if row and row.state == ProcedureState.WAITING else None

    return check


def test_past_the_deadline_the_domain_stays_pending_and_the_customer_is_told_what_is_missing(
    world,
):
    """The customer publishes SPF and DKIM but never DMARC nor the return path; at the
    deadline the domain stays pending and their notice, in Italian, names what is missing."""
    engine, cli = world["engine"], world["cli"]
    relay = RelayProcess(world["home"], extra_env=world["env"]).start()
    world["started"].append(relay)
    settings = load_settings(
        home=world["home"].path,
        database_url=world["home"].db_url,
        hostname=RELAY,
        submission_listen=world["home"].env["AXIOM_SUBMISSION_LISTEN"],
    )
    with session_scope(engine) as s:
        customer_mail.ensure_notice_sender(s, settings)  # what `axiom init` does
        tenants.set_tenant(s, "acme", contact="it@acme.example")  # language: it
        s.commit()
    world["serve"]()
    _onboard(expected_per_month=5_000)
    _until("waiting for DNS", _waiting_for(engine, f"DNS of {DOMAIN}"))
    world["publish"]("spf", "dkim")
    cli("sandbox", "clock", "advance", "15d")  # past the 14-day deadline
    cli("procedures", "sweep", "--json")
    done = _until("finished", _finished(engine))
    assert done.outcome["outcome"] == "deadline"
    missing = {m["name"] for m in done.outcome["missing"]}
    assert {"dmarc.record", "return_path.mx"} <= missing
    assert not any(name.startswith(("dkim:", "spf.")) for name in missing), missing
    with session_scope(engine) as s:
        assert s.exec(select(Domain).where(Domain.name == DOMAIN)).one().state == "pending"
        assert s.exec(select(Stream)).all() == []  # nothing bound
    notice = done.outcome["notice"]
    assert notice["sent"] and notice["in_language"] == "it", notice
    sent = _until(
        "the notice spooled",
        lambda: _message_to(world["home"].db_url, "it@acme.example"),
        timeout=30,
    )
    assert "non è ancora attivo" in sent and "dmarc.record" in sent and "return_path.mx" in sent


def _message_to(db_url: str, address: str) -> str | None:
    import email

    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            for row in s.exec(select(Message)).all():
                parsed = email.message_from_bytes(bytes(row.data), policy=email.policy.default)
                if address in str(parsed["To"]):
                    part = parsed.get_body(("plain",))
                    return f"{parsed['Subject']}\n{part.get_content() if part else ''}"
    finally:
        engine.dispose()
    return None
