"""The blocklist runbooks end to end in the sandbox world (issue 16): the world as its own
process serving the lists of runbooks/blocklists.yaml, a relay delivering into it, a real
Prefect server serving the deployments, the fake Slack, the CLI.

An IP is listed in the sandbox's Spamhaus ZEN → one scan finds it and protects it → the relay
stops sending from it to Microsoft (which consults ZEN) while Gmail (which consults no list)
still gets its mail → the cause is confirmed fixed by the CLI, the request submitted in Slack
→ the control plane dies while the procedure waits for the listing to clear → the world
unlists the IP → the next scan sees it clear → the procedure, continued by a new runner,
lifts the protection, starts the re-warm and resolves the incident.
"""

from __future__ import annotations

import json
import re
import smtplib
import ssl
import time
from datetime import UTC, datetime

import httpx
import pytest
from prefect.deployments import run_deployment
from sqlmodel import select

from models import (
    AuditEntry,
    DeliveryEvent,
    Incident,
    IpAddress,
    IpPool,
    IpState,
    Procedure,
    ProcedureState,
    Suspension,
    WarmupPlan,
)
from models.blocklists import BlocklistListing
from models.db import make_engine, session_scope
from models.sandbox_clock import clock_for
from protocol import operators
from testbed.axiom import (
    ControlProcess,
    FlowsProcess,
    RelayProcess,
    flow_run_processes,
    seed_tenant,
)
from tests.fakes.slack import FakeSlack, button_click, sign
from tests.integration.test_sandbox_cli import WorldProcess

pytestmark = pytest.mark.integration

LISTED = "127.0.0.10"  # not 127.0.0.2: every list lists that one (RFC 5782 test entry)
SECRET = "8f14e45fceea167a5a36dedd4bea2543"
ZEN_PROVIDERS = {"microsoft", "yahoo", "apple", "generic"}


def _until(what: str, check, timeout: float = 120, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout}s")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_listing_is_protected_at_once_and_delisted_through_a_restart(axiom_home, prefect, db_url):
    home = axiom_home
    engine = make_engine(home.db_url)
    world = WorldProcess(home).start()
    started: list = []
    slack = FakeSlack()
    try:
        world_env = {
            "AXIOM_DELIVERY_PORT": world.env["AXIOM_DELIVERY_PORT"],
            "AXIOM_DNS_NAMESERVERS": world.env["AXIOM_SANDBOX_DNS_LISTEN"],
        }
        tenant = seed_tenant(home, "acme", "acme.axiom.test")
        with session_scope(engine) as s:  # the default pool gets a second IP
            pool = s.exec(select(IpPool).where(IpPool.name == "default")).one()
            s.add(IpAddress(address=LISTED, pool_id=pool.id, state=IpState.active))
            operators.add_operator(s, "bob", ["lead"], "U0BOB")
            operators.add_operator(s, "carol", ["deliverability"], None)
            s.commit()
        relay = RelayProcess(home, world_env).start()
        started.append(relay)
        slack_env = {
            "AXIOM_SLACK_BOT_TOKEN": slack.token,
            "AXIOM_SLACK_CHANNEL": "C0APPROVALS",
            "AXIOM_SLACK_API_URL": slack.base_url,
            "AXIOM_SLACK_SIGNING_SECRET": SECRET,
        }
        env = world_env | slack_env | {"AXIOM_PREFECT_API_URL": prefect.api_url}
        control = ControlProcess(home, env).start()
        started.append(control)
        flows = FlowsProcess(home, prefect.env, **env).start()
        started.append(flows)

        def cli(*args: str, check: bool = True):
            return home.cli(*args, check=check, extra_env=env)

        # The day's mail before the listing: what the evidence will show, by tenant and stream.
        before = datetime.now(UTC)
        for n in range(16):  # by weight over two IPs: the listed one sends some (1 - 2^-16)
            _submit(relay, tenant, f"early{n}@gmail.com")
        _until("16 attempts", lambda: len(_attempts(engine, before)) >= 16)

        # The world lists the IP in its Spamhaus ZEN; one scan finds and protects it.
        world.cli("list-ip", LISTED, "--reason", "spam trap hits")
        world.cli("list-domain", tenant.domain, "--reason", "spamvertised")
        checked = cli("blocklist", "check", LISTED, "--json", check=False)
        assert checked.returncode == 1
        zen = next(r for r in json.loads(checked.stdout)["lists"] if r["list"] == "spamhaus-zen")
        assert zen["status"] == "listed" and zen["codes"] == ["127.0.0.2"]
        scan = run_deployment("blocklist-scan/scheduled", timeout=120)
        assert scan.state.is_completed(), scan.state.message
        with session_scope(engine) as s:
            rows = s.exec(select(BlocklistListing)).all()
            # one listing, and no list failed to answer (the sandbox serves every declared zone)
            found = {(r.target, r.list_id, r.state, tuple(r.codes), r.last_error) for r in rows}
            assert (LISTED, "spamhaus-zen", "listed", ("127.0.0.2",), None) in found
            assert (tenant.domain, "spamhaus-dbl", "listed", ("127.0.1.2",), None) in found
            # nothing else but the domain's return path (DBL ignores the host part): no list
            # failed to answer, 127.0.0.1 is clean
            assert {t for t, *_ in found} <= {LISTED, tenant.domain, f"bounces.{tenant.domain}"}
            assert all(r.state == "listed" and r.last_error is None for r in rows)
            # a listed domain: an incident for a person, no automatic step
            domain_incident = s.exec(
                select(Incident).where(Incident.subject == f"domain:{tenant.domain}")
            ).one()
            assert (domain_incident.cause, domain_incident.severity) == ("blocklisted", "critical")
            protected = {r.provider for r in s.exec(select(Suspension)).all()}
        assert protected == ZEN_PROVIDERS  # Google consults no list: not suspended there

        # The relay now sends Microsoft's mail from the other IP only; Gmail's from both.
        since = datetime.now(UTC)
        for n in range(24):
            _submit(relay, tenant, f"user{n}@outlook.com" if n % 2 else f"user{n}@gmail.com")
        seen = _until(
            "24 attempts", lambda: (rows := _attempts(engine, since)) and len(rows) >= 24 and rows
        )
        to_microsoft = {ip for ip, provider in seen if provider == "microsoft"}
        to_google = {ip for ip, provider in seen if provider == "google"}
        assert to_microsoft == {"127.0.0.1"}, seen
        assert LISTED in to_google, seen  # 12 picks by weight over two IPs

        # The delisting procedure asks whether the cause is fixed, with the evidence.
        asking = _until("fixed asked", _waiting(engine, "approval #"))
        posted = slack.wait_for("chat.postMessage")
        text = json.dumps([p.args for p in posted])
        assert f"approval:{asking.approval_id}" in text
        assert "SBL: manually listed" in text, text  # the listing's meaning
        assert "acme/transactional" in text, text  # the IP's traffic by tenant and stream
        cli(
            "approve",
            str(asking.approval_id),
            "--as",
            "carol",
            "--comment",
            "a stale list in acme's campaign; the stream was cleaned",
        )
        cli("procedures", "sweep", "--json")
        requested = _until(
            "requested asked", _waiting(engine, "approval #", after=asking.approval_id)
        )
        body = button_click(requested.approval_id, "approve", "U0BOB")
        answer = httpx.post(
            f"{control.url}/slack/interactivity", content=body, headers=sign(SECRET, body)
        )
        assert answer.status_code == 200
        cli("procedures", "sweep", "--json")
        _until("watching", _waiting(engine, "to clear"))

        # The control plane dies while the procedure waits for the listing to clear.
        _until("no process holding it", lambda: flow_run_processes(flows.pid) == [], timeout=60)
        flows.kill_all()
        world.cli("unlist-ip", LISTED)
        flows = FlowsProcess(home, prefect.env, **env).start()
        started.append(flows)
        scan = run_deployment("blocklist-scan/scheduled", timeout=120)
        assert scan.state.is_completed(), scan.state.message
        with session_scope(engine) as s:
            row = s.exec(
                select(BlocklistListing).where(
                    BlocklistListing.target == LISTED, BlocklistListing.list_id == "spamhaus-zen"
                )
            ).one()
            assert row.state == "clear" and row.cleared_at is not None
        cli("sandbox", "clock", "advance", "16m")
        cli("procedures", "sweep", "--json")
        done = _until("delisted", _finished(engine))
        assert done.outcome["outcome"] == "delisted"
        assert done.outcome["cause"] == "a stale list in acme's campaign; the stream was cleaned"
        now = clock_for("sandbox", engine).now()  # 16 minutes ahead of the system clock
        with session_scope(engine) as s:
            live = [r for r in s.exec(select(Suspension)).all() if _aware(r.expires_at) > now]
            assert live == []  # the protection lifted
            plan = s.exec(select(WarmupPlan)).one()
            assert (plan.schedule_id, plan.reason, plan.state) == ("rewarm", "delisted", "running")
            incident = s.exec(select(Incident).where(Incident.subject == f"ip:{LISTED}")).one()
            assert incident.state == "resolved" and incident.subject == f"ip:{LISTED}"
            actions = [
                e.action
                for e in s.exec(select(AuditEntry).order_by(AuditEntry.id)).all()
                if (
                    e.action.startswith(("blocklist.", "warmup."))
                    or e.action == "incident.resolved"
                )
                and not e.subject.startswith("domain:")
            ]
        assert actions == [
            "blocklist.listed",
            "blocklist.protect",
            "blocklist.cleared",
            "blocklist.unprotect",
            "warmup.start",
            "incident.resolved",
        ]
    finally:
        for process in reversed(started):
            if process.running:
                if isinstance(process, FlowsProcess):
                    process.kill_all()
                else:
                    process.stop()
        world.stop()
        slack.close()
        engine.dispose()


def _submit(relay, tenant, rcpt: str) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test relay's certificate is self-signed
    host, port = relay.submission
    message = (
        f"From: Shop <shop@{tenant.domain}>\r\nTo: <{rcpt}>\r\nSubject: Order\r\n"
        f"Message-ID: <{time.monotonic_ns()}@{tenant.domain}>\r\n\r\nShipped.\r\n"
    )
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.starttls(context=context)
        client.login(tenant.username, tenant.password)
        refused = client.sendmail(f"shop@{tenant.domain}", [rcpt], message.encode())
    assert not refused and re.match(r"^[^@]+@", rcpt)


def _attempts(engine, since) -> list[tuple[str, str]]:
    with session_scope(engine) as s:
        rows = s.exec(
            select(DeliveryEvent.source_ip, DeliveryEvent.provider).where(
                DeliveryEvent.at >= since, DeliveryEvent.kind == "attempt"
            )
        ).all()
    return [(ip, provider) for ip, provider in rows]


def _delisting(engine) -> Procedure | None:
    with session_scope(engine) as s:
        return s.exec(select(Procedure).where(Procedure.name == "blocklist-delisting")).first()


def _waiting(engine, text: str, after: int | None = None):
    def check():
        row = _delisting(engine)
        ok = (
            row
            and row.state == ProcedureState.WAITING
            and text in (row.waiting_for or "")
            and (after is None or (row.approval_id or 0) > after)
        )
        return row if ok else None

    return check


def _finished(engine):
    def check():
        row = _delisting(engine)
        return row if row and row.state == ProcedureState.FINISHED else None

    return check


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
