"""The degradation-triage runbook end to end in the sandbox world (issue 17): the world as its
own process, a relay delivering into it (its inbound listener taking the providers' complaint
reports), a real Prefect server serving the deployments, the fake Slack, the CLI, the sandbox
clock.

1. A complaint spike (the world's complaint-spike scenario: Yahoo and Microsoft send ARF
   reports) → an incident on the stream within two triage cycles, cause content, proposal
   "pause stream" → triage.act asked in Slack with the evidence and a chart, approved by a
   signed click → the stream is held and the customer told → a third cycle folds into the same
   incident (one Slack message, updated in place) → the control plane is killed while the
   procedure waits and a new one started → two hours later on the sandbox clock the
   verification finds no complaints since the hold: resolved.
2. Rate-limit deferrals on a cold IP → the path's rate is lowered at once (automatic), before
   the world blocks the IP: at iCloud, where the triage is the first to act; Gmail's 4.7.28
   is answered by the relay's own reaction (a 10-minute suspension) at its first occurrence.
3. Broken DKIM for one domain → an authentication incident naming the domain.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prefect.deployments import run_deployment
from sqlmodel import select

from models import (
    AuditEntry,
    Incident,
    IncidentEvent,
    IpAddress,
    IpPool,
    IpState,
    Procedure,
    ProcedureState,
    Stream,
    Suspension,
)
from models.db import make_engine, session_scope
from models.egress import HOLD_POOL
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

SECRET = "8f14e45fceea167a5a36dedd4bea2543"
COLD = "127.0.0.10"
SPIKE_IPS = ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14")


def _until(what: str, check, timeout: float = 120, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout}s")


def _respond(engine, incident_id: int) -> Procedure | None:
    with session_scope(engine) as s:
        return s.exec(
            select(Procedure).where(
                Procedure.name == "degradation-triage",
                Procedure.subject == f"incident:{incident_id}",
            )
        ).first()


def _incident(engine, subject: str, cause: str | None = None) -> Incident | None:
    with session_scope(engine) as s:
        query = select(Incident).where(Incident.subject == subject)
        if cause:
            query = query.where(Incident.cause == cause)
        return s.exec(query.order_by(Incident.id.desc())).first()


def _cycle() -> None:
    started = time.monotonic()
    run = run_deployment("degradation-triage/scheduled", timeout=180)
    assert run.state.is_completed(), run.state.message
    print(f"triage cycle: {time.monotonic() - started:.1f} s")


# PostgreSQL, the multi-node backend; the same load (a detection run and seven respond
# procedures at once beside the relay) on SQLite is tests/integration/test_sqlite_turns.py.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_triage_catches_acts_verifies_and_resolves_in_the_sandbox(axiom_home, prefect, db_url):
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
        demo = seed_tenant(home, "demo", "demo.axiom.test")
        (home.path / "up.json").write_text(
            json.dumps(
                {
                    "submission": f"127.0.0.1:{home.ports['submission']}",
                    "username": demo.username,
                    "password": demo.password,
                    "domain": demo.domain,
                }
            )
        )
        with session_scope(engine) as s:
            operators.add_operator(s, "bob", ["lead"], "U0BOB")
            # The stream sends from a pool of five IPs, as a customer's stream does: each
            # provider judges each IP on its own, the stream's complaints add up over all.
            pool = s.exec(select(IpPool).where(IpPool.name == "default")).one()
            for ip in SPIKE_IPS:
                s.add(IpAddress(address=ip, pool_id=pool.id, state=IpState.active))
            s.commit()
        home.cli("init")  # the customer notices' sender, as `axiom init` leaves it
        home.cli("tenant", "set", "demo", "--contact", "ops@gmail.com", "--language", "it")
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

        # 1. A complaint spike: Yahoo and Microsoft report complaints on the demo stream.
        spike = json.loads(
            world.cli(
                "scenario",
                "complaint-spike",
                "--count",
                "300",
                "--complaint-share",
                "0.1",
                "--timeout",
                "240",
                "--json",
            ).stdout
        )
        assert spike["settled"] is True, spike
        label = "stream:demo/transactional"
        cycles = 0
        found = None
        while found is None and cycles < 2:  # within two cycles
            cycles += 1
            _cycle()
            found = _incident(engine, label, "content")
        if found is None:
            with session_scope(engine) as s:
                seen = [(i.subject, i.cause, i.severity) for i in s.exec(select(Incident)).all()]
            raise AssertionError(f"no content incident on {label}: {seen}; {spike['providers']}")
        assert found.severity == "critical"
        assert found.evidence["proposal"]["action"] == "pause_stream"
        respond = _until(
            "triage.act asked",
            lambda: (
                (r := _respond(engine, found.id))
                and (r.state == ProcedureState.WAITING and "approval #" in (r.waiting_for or ""))
                and r
            ),
        )
        posted = json.dumps(
            [c.args for c in slack.calls_to("chat.postMessage")], ensure_ascii=False
        )
        assert f"approval:{respond.approval_id}" in posted
        assert "pause stream on stream:demo/transactional" in posted
        assert "complaint" in posted and "█" in posted  # the evidence and its chart
        body = button_click(respond.approval_id, "approve", "U0BOB")
        answer = httpx.post(
            f"{control.url}/slack/interactivity", content=body, headers=sign(SECRET, body)
        )
        assert answer.status_code == 200
        cli("procedures", "sweep", "--json")
        _until(
            "verification waits",
            lambda: (
                (r := _respond(engine, found.id))
                and ("verifying pause_stream" in (r.waiting_for or ""))
            ),
        )
        with session_scope(engine) as s:
            stream = s.exec(select(Stream).where(Stream.name == "transactional")).one()
            assert s.get(IpPool, stream.pool_id).name == HOLD_POOL
            held = s.exec(select(AuditEntry).where(AuditEntry.action == "stream.suspend")).one()
            assert held.evidence["approved_by"] == "bob"
            assert held.runbook_id == "degradation-triage"
            told = s.exec(select(AuditEntry).where(AuditEntry.action == "notice.sent")).all()
            assert any(e.evidence["notice"] == "email_triage_report" for e in told)
        # The cause persists in the windows: the next cycle folds into the same incident, and
        # its one Slack message is updated in place.
        _cycle()
        again = _incident(engine, label, "content")
        assert again.id == found.id and again.occurrences >= 2
        with session_scope(engine) as s:
            timeline = s.exec(
                select(IncidentEvent).where(IncidentEvent.incident_id == found.id)
            ).all()
            assert {e.kind for e in timeline} >= {"signal", "approval", "action", "state"}
        updated = [c for c in slack.calls_to("chat.update") if c.args.get("ts") == again.slack_ts]
        assert again.slack_ts and updated, "the incident's message was not updated in place"
        # The control plane dies while the procedure waits to verify; a new one continues it.
        _until("no process holding it", lambda: flow_run_processes(flows.pid) == [], timeout=60)
        flows.kill_all()
        flows = FlowsProcess(home, prefect.env, **env).start()
        started.append(flows)
        # Two hours later (the content cause's interval) the verification resolves it.
        cli("sandbox", "clock", "advance", "121m")
        cli("procedures", "sweep", "--json")
        done = _until(
            "resolved",
            lambda: (
                (r := _respond(engine, found.id)) and (r.state == ProcedureState.FINISHED) and r
            ),
            timeout=180,
        )
        assert done.outcome["outcome"] == "resolved", done.outcome
        assert _incident(engine, label, "content").state == "resolved"

        # 2. Rate-limit deferrals on a cold IP: the path is slowed at once, before the world
        # blocks the IP (at twice its day's allowance). The stream is released first.
        # Gmail's 4.7.28 suspends the path at its first occurrence (the relay's reaction, as
        # Google asks: stop for 10 minutes), so Gmail's deferrals never fill the triage's
        # 15-minute window (50 attempts, 10 deferrals); iCloud's rate limits have no reaction
        # of their own (the relay's generic storm rule waits for 10 in 10 minutes): there the
        # triage is the first to slow the path.
        cli("stream", "release", "demo", "transactional", "--as", "bob", "--reason", "list fixed")
        with session_scope(engine) as s:
            pool = s.exec(select(IpPool).where(IpPool.name == "default")).one()
            s.add(IpAddress(address=COLD, pool_id=pool.id, state=IpState.active))
            for ip in s.exec(select(IpAddress)).all():
                if ip.address != COLD:
                    ip.state = IpState.retired  # only the cold IP sends
                    s.add(ip)
            s.commit()
        campaign = json.loads(
            world.cli(
                "scenario", "cold-ip-campaign", "--count", "240", "--timeout", "120", "--json"
            ).stdout
        )
        by = {p["provider"]: p for p in campaign["providers"]}
        # Gmail never blocks: its first 4.7.28 suspended the path. What was already in flight
        # then is deferred, the rest held; how many of each depends on the machine's speed
        # (a fresh clone once had all 20 in flight), so the suspension itself is the evidence.
        assert by["google"]["blocked"] == 0, by["google"]
        assert by["google"]["held"] + by["google"]["deferred"] > 0, by["google"]
        gmail = [s for s in campaign["suspensions"] if (s["ip"], s["provider"]) == (COLD, "google")]
        assert any(s["action"] == "suspend" for s in gmail), campaign["suspensions"]
        icloud = by["apple"]
        assert icloud["deferred"] >= 10 and icloud["blocked"] == 0, icloud
        _cycle()
        path = _incident(engine, f"path:{COLD}/apple", "reputation")
        assert path is not None, icloud
        assert path.evidence["proposal"]["action"] == "lower_rate"
        # the path's incident and the domain's at that provider may each lower it (the lowest
        # limit wins)
        throttles = _until("the path throttled", lambda: _throttles(engine, COLD, "apple"))
        assert all(t.action == "throttle" and t.limit_per_minute >= 1 for t in throttles)

        # 3. Broken DKIM for one domain: an authentication incident naming it. A day later
        # (the providers' day windows start again), from the established IPs.
        cli("sandbox", "clock", "advance", "1d")
        with session_scope(engine) as s:
            for ip in s.exec(select(IpAddress)).all():
                ip.state = IpState.retired if ip.address == COLD else IpState.active
                s.add(ip)
            s.commit()
        broken = json.loads(
            world.cli(
                "scenario", "broken-dkim", "--count", "240", "--timeout", "120", "--json"
            ).stdout
        )
        refused = {p["provider"]: p["refused"] for p in broken["providers"]}
        assert refused.get("google", 0) >= 5, broken["providers"]
        _cycle()
        with session_scope(engine) as s:
            auth = s.exec(select(Incident).where(Incident.cause == "authentication")).all()
            subjects = {i.subject for i in auth}
        assert f"domain:{demo.domain}/google" in subjects, (subjects, refused)
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


def _throttles(engine, ip: str, provider: str) -> list[Suspension]:
    with session_scope(engine) as s:
        return list(
            s.exec(
                select(Suspension).where(
                    Suspension.source_ip == ip,
                    Suspension.provider == provider,
                    Suspension.rule_id.like("triage:%"),
                )
            ).all()
        )
