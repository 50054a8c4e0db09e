"""Durable procedures through a real Prefect server and `axiom flows serve` (issue 12 §1).

Each test runs the control plane as it runs in production — `axiom flows serve` (or, for the
clock wait, a runner of this package's own flow) against a private `prefect server` — kills it
with SIGKILL (the runner and every flow run it started) in the middle of a wait, gives an
answer or moves the sandbox clock while nothing of the control plane runs, starts it again,
and checks that the procedure went on from where it was and that each decision was acted on
exactly once. While a procedure waits, no process of the control plane holds it: the runner's
flow-run processes are counted (testbed.axiom.flow_run_processes).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from sqlmodel import select

from models import AuditEntry, IpPool, Procedure, ProcedureState, Stream
from models.db import make_engine, session_scope
from protocol import operators
from testbed.axiom import ControlProcess, FlowsProcess, flow_run_processes, make_home, seed_tenant
from tests.fakes.slack import FakeSlack, button_click, sign

pytestmark = pytest.mark.integration


@pytest.fixture
def plane(prefect, tmp_path):
    """A sandbox home (SQLite) with tenant acme and operator alice, and its control plane."""
    home = make_home(tmp_path / "home", f"sqlite:///{tmp_path / 'axiom.db'}")
    seed_tenant(home, "acme", "acme.example")
    engine = make_engine(home.db_url)
    with session_scope(engine) as s:
        operators.add_operator(s, "alice", ["deliverability"], None)
        s.commit()
    started: list[FlowsProcess] = []

    def serve(command: list[str] | None = None, **env: str) -> FlowsProcess:
        process = FlowsProcess(home, prefect.env, command=command, **env).start()
        started.append(process)
        return process

    def cli(*args: str):  # the CLI of an operator whose Prefect is this server
        return home.cli(*args, extra_env={"AXIOM_PREFECT_API_URL": prefect.api_url})

    home.cli_prefect = cli
    yield home, engine, serve
    for process in started:
        if process.running:
            process.kill_all()
    engine.dispose()


def _until(what: str, check: Callable[[], object], timeout: float = 90, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout}s")


def _procedure(engine, name: str) -> Procedure | None:
    with session_scope(engine) as s:
        return s.exec(select(Procedure).where(Procedure.name == name)).first()


def _waiting(engine, name: str) -> Callable[[], Procedure | None]:
    def check():
        row = _procedure(engine, name)
        return row if row is not None and row.state == ProcedureState.WAITING else None

    return check


def _run_state(flow_run_id: str) -> str:
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return f"{run.state.type.value}/{run.state.name}"


def _audit(engine, action: str) -> list[AuditEntry]:
    with session_scope(engine) as s:
        return list(s.exec(select(AuditEntry).where(AuditEntry.action == action)).all())


def _pool_of(engine, tenant_stream: str) -> str | None:
    with session_scope(engine) as s:
        stream = s.exec(select(Stream).where(Stream.name == tenant_stream)).first()
        pool = s.get(IpPool, stream.pool_id) if stream else None
        return pool.name if pool else None


def _suspend_news() -> str:
    run = run_deployment(
        "suspend-stream/on-demand",
        parameters={"tenant": "acme", "stream": "news", "reason": "spam-trap hits"},
        timeout=0,
    )
    return str(run.id)


def test_an_answer_given_while_the_control_plane_is_down_is_acted_on_once_when_it_returns(
    plane,
):
    home, engine, serve = plane
    flows = serve()
    run_id = _suspend_news()
    waiting = _until("waiting for its approval", _waiting(engine, "suspend-stream"))
    assert waiting.flow_run_id == run_id and waiting.approval_id is not None
    assert waiting.waiting_for == f"approval #{waiting.approval_id} (stream.suspend)"
    _until("suspended in Prefect", lambda: _run_state(run_id) == "PAUSED/Suspended")
    # the wait holds no process: the runner has no flow run running
    _until("its run's process gone", lambda: flow_run_processes(flows.pid) == [], timeout=30)

    listed = json.loads(home.cli("procedures", "--json").stdout)
    assert [(p["procedure"], p["state"], p["subject"]) for p in listed] == [
        ("suspend-stream", "waiting", "stream:acme/news")
    ]

    # The control plane dies; the answer comes meanwhile, by a CLI that cannot reach Prefect
    # either (no API URL): it records the decision, the resume fails. Back, the sweep
    # (procedures-sweep/scheduled, served by the runner; its every-minute schedule is checked
    # in test_deployments, here a run of it is asked for at once) finds the answered approval
    # and resumes the run.
    flows.kill_all()
    approved = home.cli("approve", str(waiting.approval_id), "--as", "alice")
    assert "approved" in approved.stdout
    assert _procedure(engine, "suspend-stream").state == ProcedureState.WAITING
    assert _pool_of(engine, "news") is None  # nothing acted while the control plane is down

    serve()  # it returns: the sweep resumes the run, which goes on from the checkpoint
    run_deployment("procedures-sweep/scheduled", timeout=0)
    done = _until(
        "finished",
        lambda: (
            (row := _procedure(engine, "suspend-stream")).state == ProcedureState.FINISHED and row
        ),
    )
    assert done.outcome["outcome"] == "held" and done.outcome["decided_by"] == "alice"
    assert _pool_of(engine, "news") == "hold"
    assert len(_audit(engine, "stream.suspend")) == 1  # acted on once
    assert len(_audit(engine, "approval.requested")) == 1  # asked once, over two processes
    assert _run_state(run_id) == "COMPLETED/Completed"
    assert json.loads(home.cli("procedures", "--json").stdout) == []


def test_an_expiry_reached_while_the_control_plane_is_down_takes_the_safe_default_once(plane):
    home, engine, serve = plane
    flows = serve()
    run_id = _suspend_news()
    waiting = _until("waiting for its approval", _waiting(engine, "suspend-stream"))
    _until("suspended in Prefect", lambda: _run_state(run_id) == "PAUSED/Suspended")
    flows.kill_all()

    home.cli("sandbox", "clock", "advance", "2h")  # past the checkpoint's 1 h time to live
    swept = json.loads(home.cli_prefect("procedures", "sweep", "--json").stdout)
    assert swept["expired"] == [waiting.approval_id] and swept["resumed"] == [waiting.id]
    again = json.loads(home.cli_prefect("procedures", "sweep", "--json").stdout)
    assert again["expired"] == [] and again["resumed"] == []  # taken once

    serve()
    done = _until(
        "finished",
        lambda: (
            (row := _procedure(engine, "suspend-stream")).state == ProcedureState.FINISHED and row
        ),
    )
    assert (done.outcome["outcome"], done.outcome["decision"]) == ("not_held", "expired")
    assert _pool_of(engine, "news") is None  # the safe default: nothing done
    (expiry,) = _audit(engine, "approval.expired")
    assert expiry.evidence["reason"] == "its time to live ran out"
    assert _audit(engine, "stream.suspend") == []


def test_a_wait_of_thirty_sandbox_days_holds_no_process_and_survives_a_restart(plane):
    home, engine, serve = plane
    own_runner = [sys.executable, "-m", "tests.integration.durable_flows"]
    flows = serve(own_runner)
    run = run_deployment("wait-days/test", parameters={"days": 30}, timeout=0)
    waiting = _until("waiting 30 days", _waiting(engine, "wait-days"))
    assert waiting.waiting_for == "30 days"
    assert abs((waiting.wait_until - waiting.wait_since).total_seconds() - 30 * 86400) < 60
    _until("suspended in Prefect", lambda: _run_state(str(run.id)) == "PAUSED/Suspended")
    _until("no process holding it", lambda: flow_run_processes(flows.pid) == [], timeout=30)

    home.cli("sandbox", "clock", "advance", "29d")
    assert json.loads(home.cli_prefect("procedures", "sweep", "--json").stdout)["resumed"] == []
    flows.kill_all()  # a restart in the middle of the wait
    flows = serve(own_runner)
    assert flow_run_processes(flows.pid) == []  # still nothing holds it
    home.cli("sandbox", "clock", "advance", "1d")
    swept = json.loads(home.cli_prefect("procedures", "sweep", "--json").stdout)
    assert swept["resumed"] == [waiting.id]
    done = _until(
        "finished",
        lambda: (row := _procedure(engine, "wait-days")).state == ProcedureState.FINISHED and row,
    )
    from datetime import datetime

    began = datetime.fromisoformat(done.outcome["began"])
    went_on = datetime.fromisoformat(done.outcome["went_on"])
    assert 30 <= (went_on - began).total_seconds() / 86400 < 30.1


def test_a_slack_click_while_the_runner_is_down_is_acted_on_when_it_returns(plane, prefect):
    """The request is in Slack before the run suspends; the click reaches the control process
    (`axiom control`, separate from the runner) which records it and resumes the run; the
    runner, back, takes the run up; the Slack message shows the outcome."""
    home, engine, serve = plane
    slack = FakeSlack()
    secret = "5f4dcc3b5aa765d61d8327deb882cf99"
    slack_env = {
        "AXIOM_SLACK_BOT_TOKEN": slack.token,
        "AXIOM_SLACK_CHANNEL": "C0APPROVALS",
        "AXIOM_SLACK_API_URL": slack.base_url,
        "AXIOM_SLACK_SIGNING_SECRET": secret,
        "AXIOM_PREFECT_API_URL": prefect.api_url,
    }
    with session_scope(engine) as s:
        operators.add_operator(s, "bob", ["lead"], "U0BOB")
        s.commit()
    control = ControlProcess(home, slack_env).start()
    try:
        flows = serve(**slack_env)
        run_id = _suspend_news()
        waiting = _until("waiting for its approval", _waiting(engine, "suspend-stream"))
        (posted,) = slack.wait_for("chat.postMessage")  # posted before the run suspended
        assert f"approval:{waiting.approval_id}" in json.dumps(posted.args)
        _until("suspended in Prefect", lambda: _run_state(run_id) == "PAUSED/Suspended")
        flows.kill_all()

        body = button_click(waiting.approval_id, "approve", "U0BOB")
        answer = httpx.post(
            f"{control.url}/slack/interactivity", content=body, headers=sign(secret, body)
        )
        assert answer.status_code == 200
        _until("resumed in Prefect", lambda: _run_state(run_id).startswith("SCHEDULED"))

        serve(**slack_env)
        done = _until(
            "finished",
            lambda: (
                (row := _procedure(engine, "suspend-stream")).state == ProcedureState.FINISHED
                and row
            ),
        )
        assert (done.outcome["outcome"], done.outcome["decided_by"]) == ("held", "bob")
        assert _pool_of(engine, "news") == "hold"
        assert len(_audit(engine, "stream.suspend")) == 1
        (update,) = slack.wait_for("chat.update")
        assert "bob" in json.dumps(update.args)
    finally:
        control.stop()
        slack.close()


def test_moving_an_incident_by_hand_updates_its_prefect_artifact(plane):
    """The incident's artifact follows a change made with the CLI (a new version)."""
    from datetime import UTC, datetime

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from protocol import incidents

    home, engine, _serve = plane
    with session_scope(engine) as s:
        incidents.report(
            s,
            subject="path:127.0.0.10/google",
            cause="repeated-reactions",
            severity="warning",
            summary="3 automatic reactions in 24 h",
            actor="flow:test",
            now=datetime.now(UTC),
        )
        s.commit()
    moved = home.cli_prefect("incidents", "set", "1", "mitigating", "--as", "alice")
    assert "not updated" not in moved.stderr, moved.stderr
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["incident-1"]))
        )
    assert "# Incident #1: repeated protective reactions" in artifact.data
    assert "| open → mitigating |" in artifact.data
