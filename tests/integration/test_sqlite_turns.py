"""SQLite's write turn (models/db.py) under the control plane's load, all on one database file:
a detection cycle that reads beside its own session (as degradation triage's did on 7 December
06:39, when every writer of every process timed out for a minute) and seven respond-like
durable procedures started at once, beside the relay taking mail, the control process and
every served deployment (tests/integration/turn_flows.py).

Before models/db.py let a thread's second connection read beside the turn that thread holds,
the cycle waited 30 s for itself — holding the turn, so the relay's spool and the procedures'
steps waited too — and failed with "no write turn in 30 s"."""

from __future__ import annotations

import smtplib
import ssl
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime
from prefect.deployments import run_deployment
from sqlmodel import select

from models import Procedure, ProcedureState, ProcedureStep
from models.db import make_engine, session_scope
from testbed.axiom import ControlProcess, FlowsProcess, RelayProcess, seed_tenant
from tests.fakes.slack import FakeSlack

pytestmark = pytest.mark.integration

RESPONDS = 7
STEPS = {"read", "act", "note"}


class _Mail:
    """Customer mail through the relay the whole time, a few messages a second: each 250
    follows a spool commit, which needs the write turn like everything else."""

    def __init__(self, relay: RelayProcess, tenant):
        self.relay, self.tenant = relay, tenant
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.refused: list[str] = []
        self.thread = threading.Thread(target=self._run, name="mail", daemon=True)

    def _run(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        host, port = self.relay.submission
        sender = f"news@{self.tenant.domain}"
        while not self.stop.is_set():
            try:
                with smtplib.SMTP(host, port, timeout=60) as client:
                    client.starttls(context=context)
                    client.login(self.tenant.username, self.tenant.password)
                    for _ in range(5):
                        n = len(self.latencies)
                        body = f"From: {sender}\r\nTo: u{n}@gmail.com\r\nSubject: {n}\r\n\r\nhi\r\n"
                        started = time.monotonic()
                        client.sendmail(sender, [f"u{n}@gmail.com"], body)
                        self.latencies.append(time.monotonic() - started)
            except (smtplib.SMTPException, OSError) as exc:
                self.refused.append(f"{type(exc).__name__}: {exc}"[:300])
            self.stop.wait(0.2)


def _procedures(engine) -> dict[str, tuple[str, set[str]]]:
    """subject → (state, steps done) of the respond procedures."""
    with session_scope(engine) as s:
        rows = s.exec(select(Procedure).where(Procedure.subject.like("test:respond-%"))).all()
        steps = s.exec(select(ProcedureStep.procedure_id, ProcedureStep.step)).all()
    done: dict[int, set[str]] = {}
    for procedure_id, step in steps:
        done.setdefault(procedure_id, set()).add(step)
    return {r.subject: (r.state, done.get(r.id or 0, set())) for r in rows}


def _runs_since(since: datetime) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since))
        )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_cycle_and_seven_procedures_at_once_beside_the_relay_all_get_the_turn(
    axiom_home, prefect, db_url, record_property
):
    home = axiom_home
    engine = make_engine(home.db_url)
    started: list = []
    slack = FakeSlack()
    mail = None
    try:
        tenant = seed_tenant(home, "demo", "demo.axiom.test")
        relay = RelayProcess(home, {"AXIOM_DELIVERY_ENABLED": "false"}).start()
        started.append(relay)
        env = {
            "AXIOM_SLACK_BOT_TOKEN": slack.token,
            "AXIOM_SLACK_CHANNEL": "C0APPROVALS",
            "AXIOM_SLACK_API_URL": slack.base_url,
            "AXIOM_SLACK_SIGNING_SECRET": "8f14e45fceea167a5a36dedd4bea2543",
            "AXIOM_PREFECT_API_URL": prefect.api_url,
        }
        started.append(ControlProcess(home, env).start())
        own_runner = [sys.executable, "-m", "tests.integration.turn_flows"]
        flows = FlowsProcess(home, prefect.env, command=own_runner, **env).start(timeout=90)
        started.append(flows)
        mail = _Mail(relay, tenant)
        mail.thread.start()

        since = datetime.now(UTC)
        t0 = time.monotonic()
        detect = run_deployment("turn-detect/test", timeout=0)
        for n in range(RESPONDS):
            run_deployment("turn-respond/test", parameters={"n": n}, timeout=0)
        deadline = t0 + 100
        seen: dict = {}
        detected = None
        while time.monotonic() < deadline:
            seen = _procedures(engine)
            with get_client(sync_client=True) as client:
                detected = client.read_flow_run(detect.id).state
            settled = len(seen) == RESPONDS and all(
                state == ProcedureState.WAITING for state, _ in seen.values()
            )
            if settled and detected is not None and detected.is_final():
                break
            time.sleep(1)
        took = time.monotonic() - t0
        mail.stop.set()
        mail.thread.join(70)
        failed = [
            f"{r.name} {r.parameters}: {r.state.message}"
            for r in _runs_since(since)
            if r.state is not None and (r.state.is_failed() or r.state.is_crashed())
        ]
        worst = max(mail.latencies, default=0.0)
        record_property(
            "measurement",
            f"sqlite turns: cycle + {RESPONDS} procedures settled in {took:.1f} s; "
            f"{len(mail.latencies)} messages beside them, slowest 250 in {worst:.2f} s",
        )
        assert detected is not None and detected.is_completed(), detected
        assert not failed, failed
        assert len(seen) == RESPONDS, seen
        for subject, (state, steps) in seen.items():
            assert state == ProcedureState.WAITING and steps >= STEPS, (subject, state, steps)
        assert mail.latencies and not mail.refused, mail.refused[:5]
        assert "no write turn" not in relay.output()
    finally:
        if mail is not None:
            mail.stop.set()
            mail.thread.join(70)
        for process in reversed(started):
            if process.running:
                if isinstance(process, FlowsProcess):
                    process.kill_all()
                else:
                    process.stop()
        slack.close()
        engine.dispose()
