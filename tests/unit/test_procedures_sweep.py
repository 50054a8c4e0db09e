"""Durable procedures and the sweep, without Prefect: steps once, what is due, what the sweep does.

The runs are a fake `Runs` (what the sweep asks Prefect); flows/sweep.py's PrefectRuns and the
whole path through a real Prefect server are tested in tests/integration/test_durable_procedures.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from models import Approval, AuditEntry, ProcedureState, ProcedureStep
from models.db import session_scope
from protocol import procedures
from protocol.approvals import WAKE_INPUT, Answer, ApprovalDesk
from protocol.operators import add_operator
from protocol.sweep import sweep
from runbooks.loader import checkpoints

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
REWAKE = timedelta(minutes=10)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeRuns:
    states: dict[str, str | None] = field(default_factory=dict)
    resumed: list[tuple[str, dict | None]] = field(default_factory=list)
    started: list[tuple[str, dict]] = field(default_factory=list)
    asked: int = 0

    def state(self, flow_run_id: str) -> str | None:
        self.asked += 1
        return self.states.get(flow_run_id)

    def resume(self, flow_run_id: str, run_input: dict | None) -> bool:
        self.resumed.append((flow_run_id, run_input))
        ok = self.states.get(flow_run_id) == "PAUSED"
        if ok:
            self.states[flow_run_id] = "SCHEDULED"
        return ok

    def start(self, deployment: str, parameters: dict) -> str:
        run_id = f"new-{len(self.started) + 1}"
        self.started.append((deployment, parameters))
        self.states[run_id] = "SCHEDULED"
        return run_id


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def desk(engine, clock) -> ApprovalDesk:
    with session_scope(engine) as s:
        add_operator(s, "alice", ["deliverability"], None)
        s.commit()
    return ApprovalDesk(engine, clock=clock)


def _begin(engine, run_id="run-1", deployment="suspend-stream/on-demand", procedure_id=None):
    return procedures.begin(
        engine,
        name="suspend-stream",
        deployment=deployment,
        runbook_id="suspend-stream",
        runbook_version="1.0",
        subject="stream:acme/news",
        parameters={"tenant": "acme", "stream": "news", "reason": "traps"},
        flow_run_id=run_id,
        procedure_id=procedure_id,
        now=T0,
    )


def _ask(desk: ApprovalDesk, proc_id: int, engine, run_id="run-1", ttl=timedelta(days=21)):
    approval = desk.open(
        checkpoint=checkpoints().spec.for_kind("stream.suspend"),
        subject="stream:acme/news",
        proposal={"action": "hold"},
        evidence={},
        runbook_id="suspend-stream",
        runbook_version="1.0",
        flow_run_id=run_id,
        ttl=ttl,
        within=lambda s, row: procedures.record_step(
            s, proc_id, "checkpoint", {"approval_id": row.id}, flow_run_id=run_id, now=T0
        ),
    )
    procedures.wait(
        engine,
        proc_id,
        key=f"approval-{approval.id}-1",
        waiting_for=f"approval #{approval.id}",
        until=approval.expires_at,
        approval_id=approval.id,
        now=T0,
    )
    return approval


def _sweep(desk, engine, runs, clock):
    return sweep(desk, engine, runs, now=clock, rewake_after=REWAKE)


def test_a_step_is_done_once_even_when_two_runs_do_it(engine):
    proc = _begin(engine)
    with session_scope(engine) as s:
        procedures.record_step(s, proc.id, "hold", {"by": "run-1"}, flow_run_id="run-1", now=T0)
        s.commit()
    with session_scope(engine) as s, pytest.raises(procedures.StepAlreadyDone) as second:
        procedures.record_step(s, proc.id, "hold", {"by": "run-2"}, flow_run_id="run-2", now=T0)
    assert second.value.result == {"by": "run-1"}
    assert procedures.step_result(engine, proc.id, "hold") == {"by": "run-1"}
    with session_scope(engine) as s:
        assert len(s.exec(select(ProcedureStep)).all()) == 1


def test_a_run_started_again_takes_up_its_own_procedure_and_a_new_run_the_one_named(engine):
    first = _begin(engine, run_id="run-1")
    assert _begin(engine, run_id="run-1").id == first.id  # a suspended run, started again
    other = _begin(engine, run_id="run-2")
    assert other.id != first.id
    taken = _begin(engine, run_id="run-3", procedure_id=first.id)  # the sweep's new run
    assert (taken.id, taken.flow_run_id, taken.state) == (first.id, "run-3", "running")
    with pytest.raises(LookupError, match="procedure #999 does not exist"):
        _begin(engine, run_id="run-4", procedure_id=999)


def test_an_idle_sweep_writes_nothing_and_asks_prefect_nothing(engine, desk, clock):
    proc = _begin(engine)
    _ask(desk, proc.id, engine)
    runs = FakeRuns({"run-1": "PAUSED"})
    with session_scope(engine) as s:
        audit_before = len(s.exec(select(AuditEntry)).all())
    report = _sweep(desk, engine, runs, clock)
    assert report.idle
    assert (runs.asked, runs.resumed, runs.started) == (0, [], [])
    with session_scope(engine) as s:
        assert len(s.exec(select(AuditEntry)).all()) == audit_before


def test_an_answer_given_while_the_control_plane_was_down_resumes_the_run(engine, desk, clock):
    proc = _begin(engine)
    approval = _ask(desk, proc.id, engine)
    desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))  # no resumer: lost
    runs = FakeRuns({"run-1": "PAUSED"})
    report = _sweep(desk, engine, runs, clock)
    assert report.resumed == [proc.id]
    assert runs.resumed == [("run-1", WAKE_INPUT)]
    report = _sweep(desk, engine, runs, clock)  # the run is on its way: not woken twice
    assert report.idle or report.resumed == []
    assert len(runs.resumed) == 1 and runs.started == []


def test_an_expiry_with_no_process_is_taken_by_the_sweep_once(engine, desk, clock):
    proc = _begin(engine)
    approval = _ask(desk, proc.id, engine, ttl=timedelta(days=21))
    runs = FakeRuns({"run-1": "PAUSED"})
    clock.now = T0 + timedelta(days=20)
    assert _sweep(desk, engine, runs, clock).idle
    clock.now = T0 + timedelta(days=21, seconds=1)
    report = _sweep(desk, engine, runs, clock)
    assert report.expired == [approval.id] and report.resumed == [proc.id]
    with session_scope(engine) as s:
        row = s.get(Approval, approval.id)
        expiries = s.exec(select(AuditEntry).where(AuditEntry.action == "approval.expired")).all()
    assert row.state == "expired"
    assert [e.evidence["reason"] for e in expiries] == ["its time to live ran out"]
    _sweep(desk, engine, runs, clock)
    with session_scope(engine) as s:
        assert (
            len(s.exec(select(AuditEntry).where(AuditEntry.action == "approval.expired")).all())
            == 1
        )


def test_a_procedure_whose_run_is_gone_goes_on_in_a_new_run_of_its_deployment(engine, desk, clock):
    proc = _begin(engine)
    approval = _ask(desk, proc.id, engine)
    desk.decide(Answer(approval.id, "approve", "cli", operator="alice"))
    runs = FakeRuns({"run-1": "FAILED"})  # Prefect failed it (its pause deadline passed)
    report = _sweep(desk, engine, runs, clock)
    assert report.started == [proc.id]
    assert runs.started == [
        (
            "suspend-stream/on-demand",
            {"tenant": "acme", "stream": "news", "reason": "traps", "procedure_id": proc.id},
        )
    ]
    assert procedures.get(engine, proc.id).flow_run_id == "new-1"
    _sweep(desk, engine, runs, clock)  # the new run is queued (control plane down): no second
    assert len(runs.started) == 1


def test_a_run_killed_mid_step_is_continued_once_it_has_not_moved_for_a_while(engine, desk, clock):
    proc = _begin(engine)  # running, and its process then killed: Prefect still says RUNNING
    runs = FakeRuns({"run-1": "RUNNING"})
    clock.now = T0 + REWAKE - timedelta(seconds=1)
    assert _sweep(desk, engine, runs, clock).idle
    clock.now = T0 + REWAKE
    assert _sweep(desk, engine, runs, clock).started == [proc.id]


def test_a_pending_approval_whose_in_process_run_crashed_takes_its_safe_default(
    engine, desk, clock
):
    proc = _begin(engine, deployment=None)  # a flow called directly: it waits in its process
    approval = _ask(desk, proc.id, engine)
    runs = FakeRuns({"run-1": "CRASHED"})
    report = _sweep(desk, engine, runs, clock)
    assert report.gone == [approval.id]
    with session_scope(engine) as s:
        row = s.get(Approval, approval.id)
        entry = s.exec(select(AuditEntry).where(AuditEntry.action == "approval.expired")).one()
    assert (row.state, row.safe_default) == ("expired", "do_nothing_and_escalate")
    assert entry.evidence["reason"] == "flow run run-1 is CRASHED"
    # the procedure is now due (its approval is decided) and nothing can continue it
    report = _sweep(desk, engine, runs, clock)
    assert report.abandoned == [proc.id]
    assert procedures.get(engine, proc.id).state == ProcedureState.FAILED


def test_a_run_cancelled_in_prefect_ends_its_procedure(engine, desk, clock):
    proc = _begin(engine)
    approval = _ask(desk, proc.id, engine, ttl=timedelta(hours=1))
    runs = FakeRuns({"run-1": "CANCELLED"})
    clock.now = T0 + timedelta(hours=2)
    report = _sweep(desk, engine, runs, clock)
    assert report.expired == [approval.id] and report.abandoned == [proc.id]
    assert runs.started == []
    row = procedures.get(engine, proc.id)
    assert (row.state, row.outcome) == (
        "failed",
        {"error": "flow run run-1 was cancelled in Prefect"},
    )


def test_open_procedures_say_what_they_wait_for_and_until_when(engine, desk):
    proc = _begin(engine)
    approval = _ask(desk, proc.id, engine, ttl=timedelta(days=21))
    page = procedures.open_procedures(engine)
    (waiting,) = page.items
    assert (waiting.id, waiting.state, waiting.waiting_for) == (
        proc.id,
        "waiting",
        f"approval #{approval.id}",
    )
    assert (waiting.since, waiting.until) == (T0, T0 + timedelta(days=21))
    procedures.finish(engine, proc.id, {"outcome": "held"}, now=T0)
    assert procedures.open_procedures(engine).items == []


def test_an_idle_sweep_is_two_selects_and_an_idle_watch_one(engine, desk, clock):
    """RUNBOOKS.md: a scheduled run with nothing to do is cheap — counted at the driver."""
    from sqlalchemy import event

    from protocol.announcements import read_reactions

    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert _sweep(desk, engine, FakeRuns(), clock).idle
        sweep_statements = list(statements)
        statements.clear()
        assert read_reactions(engine) == []
        watch_statements = list(statements)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert [s for s in sweep_statements if s not in ("BEGIN",)] == ["SELECT", "SELECT"]
    assert [s for s in watch_statements if s not in ("BEGIN",)] == ["SELECT"]
