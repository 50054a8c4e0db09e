"""The sweep: what makes waits durable when no process holds them (runbooks/procedures-sweep.yaml).

Run every minute by flows/sweep.py, it asks two indexed questions — which approvals are
pending, which waiting procedures are due — and with both answers empty it returns having
written nothing. Otherwise, in this order:

1. an overdue approval is expired: the runbook's safe default, audited, Slack updated;
2. a pending approval whose run is gone (crashed, cancelled, deleted) and that no durable
   procedure waits for is expired at once, with that reason: nothing could act on an answer;
3. a due procedure is woken: its suspended run resumed, or — its run gone — a new run of its
   deployment started with its id, which replays the steps already done; a run cancelled by a
   person in Prefect ends the procedure instead;
4. a pending request whose Slack post failed is posted again.

The runs are reached through `Runs` (flows/sweep.py implements it with the Prefect client), so
the order and the idempotence are tested here without a Prefect server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import Engine
from sqlmodel import col, select

from models import Procedure, ProcedureState
from models.audit import as_utc
from models.audit_trail import record
from models.db import session_scope
from protocol import procedures
from protocol.approvals import PENDING, WAKE_INPUT, ApprovalDesk

log = logging.getLogger("axiom.sweep")

# Prefect state types (prefect.client.schemas.objects.StateType values), as strings here
ON_ITS_WAY = {"SCHEDULED", "PENDING", "RUNNING"}
PAUSED = "PAUSED"
CANCELLED = {"CANCELLED", "CANCELLING"}


class RunsUnavailable(Exception):
    """The orchestrator could not be asked (down, unreachable): the next sweep tries again."""


class Runs(Protocol):
    """What the sweep needs of the orchestrator."""

    def state(self, flow_run_id: str) -> str | None:
        """The run's state type (SCHEDULED, RUNNING, PAUSED, COMPLETED, FAILED, CRASHED,
        CANCELLED, …), or None when the run does not exist."""

    def resume(self, flow_run_id: str, run_input: dict | None) -> bool: ...

    def start(self, deployment: str, parameters: dict) -> str:
        """Start a run of `deployment` now; its flow run id."""


@dataclass
class SweepReport:
    expired: list[int] = field(default_factory=list)  # approval ids
    gone: list[int] = field(default_factory=list)  # approvals resolved because their run is gone
    resumed: list[int] = field(default_factory=list)  # procedure ids
    started: list[int] = field(default_factory=list)  # procedure ids continued in a new run
    abandoned: list[int] = field(default_factory=list)  # procedure ids whose run was cancelled
    posted: list[int] = field(default_factory=list)  # approval ids posted to Slack again
    unreachable: list[str] = field(default_factory=list)  # what Prefect did not answer

    @property
    def idle(self) -> bool:
        return not any(vars(self).values())

    def as_json(self) -> dict:
        return dict(vars(self))


def sweep(
    desk: ApprovalDesk,
    engine: Engine,
    runs: Runs,
    *,
    now: Callable[[], datetime],
    rewake_after: timedelta,
) -> SweepReport:
    report = SweepReport()
    pending = desk.pending()
    due = procedures.due(engine, now(), stuck_before=now() - rewake_after)
    if not pending and not due:
        return report  # the common case: two reads, nothing written
    durable = _waited_for_by_procedures(engine, [a.id for a in pending if a.id is not None])
    for approval in pending:
        assert approval.id is not None
        if as_utc(approval.expires_at) <= now():
            row = desk.expire(approval.id)
            if row is not None and row.state != PENDING:
                report.expired.append(approval.id)
                if approval.id not in durable and approval.flow_run_id:
                    with contextlib.suppress(RunsUnavailable):  # its own timer wakes it too
                        runs.resume(approval.flow_run_id, WAKE_INPUT)  # an in-process pause
            continue
        if approval.id in durable or not approval.flow_run_id:
            continue
        try:
            state = runs.state(approval.flow_run_id)
        except RunsUnavailable as exc:
            report.unreachable.append(f"approval #{approval.id}: {exc}")
            continue
        if state is None or state in CANCELLED or state in {"COMPLETED", "FAILED", "CRASHED"}:
            gone = f"flow run {approval.flow_run_id} is {state or 'gone'}"
            row = desk.expire(approval.id, run_gone=gone)
            if row is not None and row.state != PENDING:
                report.gone.append(approval.id)
    if report.expired:  # procedures waiting for those approvals are due now too
        due = procedures.due(engine, now(), stuck_before=now() - rewake_after)
    for proc in due:
        try:
            _wake(proc, desk, engine, runs, now(), rewake_after, report)
        except RunsUnavailable as exc:
            report.unreachable.append(f"procedure #{proc.id}: {exc}")
    for approval_id in desk.unposted():
        if desk.announce_once(approval_id):
            report.posted.append(approval_id)
    return report


def _wake(
    proc: Procedure,
    desk: ApprovalDesk,
    engine: Engine,
    runs: Runs,
    now: datetime,
    rewake_after: timedelta,
    report: SweepReport,
) -> None:
    assert proc.id is not None
    state = runs.state(proc.flow_run_id) if proc.flow_run_id else None
    if state in CANCELLED:
        _abandon(proc, desk, engine, now, f"flow run {proc.flow_run_id} was cancelled in Prefect")
        report.abandoned.append(proc.id)
        return
    if state == PAUSED and proc.flow_run_id:
        run_input = WAKE_INPUT if proc.approval_id is not None else None
        if runs.resume(proc.flow_run_id, run_input):
            procedures.woken(engine, proc.id, flow_run_id=None, now=now)
            report.resumed.append(proc.id)
            return
    if state == "SCHEDULED":
        return  # queued for its served deployment: `axiom flows serve` takes it when it runs
    if state in ON_ITS_WAY and proc.state == ProcedureState.WAITING:
        if proc.woken_at is None:  # resumed by an answer path a moment ago: note when
            procedures.woken(engine, proc.id, flow_run_id=None, now=now)
            return
        if now - as_utc(proc.woken_at) < rewake_after:
            return  # starting on it right now
    # Its run is gone (finished, failed, crashed, deleted), or it has not moved for
    # rewake_after while Prefect still shows it running (its process was killed): another
    # run goes on from the recorded steps.
    if proc.deployment is None:
        _abandon(proc, desk, engine, now, "its run is gone and it has no deployment to go on from")
        report.abandoned.append(proc.id)
        return
    flow_run_id = runs.start(proc.deployment, {**proc.parameters, "procedure_id": proc.id})
    procedures.woken(engine, proc.id, flow_run_id=flow_run_id, now=now)
    log.info(
        "procedure #%s (%s): run %s is gone; continued in run %s",
        proc.id,
        proc.name,
        proc.flow_run_id,
        flow_run_id,
    )
    report.started.append(proc.id)


def _abandon(proc: Procedure, desk: ApprovalDesk, engine: Engine, now: datetime, why: str) -> None:
    """Nothing can continue it: its pending approval takes the safe default, it ends failed."""
    assert proc.id is not None
    if proc.approval_id is not None:
        desk.expire(proc.approval_id, run_gone=why)
    procedures.finish(engine, proc.id, {"error": why}, now=now, failed=True)
    with session_scope(engine) as session:
        record(
            session,
            actor="flow:procedures-sweep",
            action="procedure.abandoned",
            subject=f"procedure:{proc.id}",
            evidence={"procedure": proc.name, "subject": proc.subject, "why": why},
            runbook_id=proc.runbook_id,
            runbook_version=proc.runbook_version,
            at=now,
        )
        session.commit()
    log.warning("procedure #%s (%s on %s) ended: %s", proc.id, proc.name, proc.subject, why)


def _waited_for_by_procedures(engine: Engine, approval_ids: list[int]) -> set[int]:
    """Of these approvals, those a procedure that can go on by itself (it has a deployment)
    waits for; the others wait in their run's own process."""
    if not approval_ids:
        return set()
    with session_scope(engine) as session:
        rows = session.exec(
            select(Procedure.approval_id).where(
                col(Procedure.approval_id).in_(approval_ids),
                col(Procedure.state).in_(ProcedureState.OPEN),
                col(Procedure.deployment).is_not(None),
            )
        ).all()
        return {row for row in rows if row is not None}
