"""Durable procedures: begin, record steps once, wait without a process, find what is due.

The flow side (flows/procedure.py) runs a procedure top-down; this service keeps its state in
the database so that any run, in any process, can take it up where it stands:

- `begin` finds the procedure a run continues (by id, or by the run itself after a resume) or
  creates it;
- `record_step` writes a step's result in the caller's transaction — the same transaction as
  the step's action and its audit entry — under a unique (procedure, step) key, so a step done
  twice by two runs is done once: the second insert fails and its transaction rolls back;
- `wait` records what the procedure waits for and until when, and the run then ends;
- `due` is the sweep's one question: which waiting procedures can go on now (their approval
  was answered or has expired, or their time has come).

Times come from the caller's clock (the sandbox clock in sandbox mode), never datetime.now().
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from models import Approval, Procedure, ProcedureState, ProcedureStep
from models.audit import as_utc
from models.db import session_scope
from protocol.listing import Page


class StepAlreadyDone(Exception):
    """Another run recorded this step first; its result is the one that counts."""

    def __init__(self, result: dict):
        super().__init__("step already done")
        self.result = result


@dataclass(frozen=True)
class Waiting:
    """One open procedure, as `axiom procedures` and the sweep's artifact show it."""

    id: int
    name: str
    subject: str
    state: str
    waiting_for: str | None
    since: datetime | None
    until: datetime | None
    flow_run_id: str | None
    runbook: str

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "procedure": self.name,
            "subject": self.subject,
            "state": self.state,
            "waiting_for": self.waiting_for,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "flow_run_id": self.flow_run_id,
            "runbook": self.runbook,
        }


def begin(
    engine: Engine,
    *,
    name: str,
    deployment: str | None,
    runbook_id: str,
    runbook_version: str,
    subject: str,
    parameters: dict,
    flow_run_id: str,
    procedure_id: int | None,
    now: datetime,
) -> Procedure:
    """The procedure this run executes: the one named, the one this run already began (a
    suspended run starts again from the top when resumed), or a new one."""
    with session_scope(engine) as session:
        if procedure_id is not None:
            row = session.get(Procedure, procedure_id)
            if row is None:
                raise LookupError(f"procedure #{procedure_id} does not exist")
            if row.name != name:
                raise LookupError(f"procedure #{procedure_id} is a {row.name}, not a {name}")
        else:
            row = session.exec(
                select(Procedure).where(Procedure.flow_run_id == flow_run_id)
            ).first() or Procedure(
                name=name,
                deployment=deployment,
                runbook_id=runbook_id,
                runbook_version=runbook_version,
                subject=subject,
                parameters=parameters,
                created_at=now,
            )
        if row.state in ProcedureState.OPEN:
            row.state = ProcedureState.RUNNING
        row.flow_run_id = flow_run_id
        row.updated_at = now
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def get(engine: Engine, procedure_id: int) -> Procedure | None:
    with session_scope(engine) as session:
        return session.get(Procedure, procedure_id)


def step_result(engine: Engine, procedure_id: int, step: str) -> dict | None:
    with session_scope(engine) as session:
        row = session.exec(
            select(ProcedureStep).where(
                ProcedureStep.procedure_id == procedure_id, ProcedureStep.step == step
            )
        ).first()
        return dict(row.result) if row is not None else None


def record_step(
    session: Session,
    procedure_id: int,
    step: str,
    result: dict,
    *,
    flow_run_id: str | None,
    now: datetime,
) -> None:
    """Record the step in the caller's transaction; StepAlreadyDone (after a rollback) when
    another run recorded it first, carrying that run's result."""
    session.add(
        ProcedureStep(
            procedure_id=procedure_id,
            step=step,
            result=result,
            flow_run_id=flow_run_id,
            done_at=now,
        )
    )
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        earlier = session.exec(
            select(ProcedureStep).where(
                ProcedureStep.procedure_id == procedure_id, ProcedureStep.step == step
            )
        ).one()
        raise StepAlreadyDone(dict(earlier.result)) from None


def wait(
    engine: Engine,
    procedure_id: int,
    *,
    key: str,
    waiting_for: str,
    until: datetime | None,
    approval_id: int | None = None,
    now: datetime,
) -> None:
    """The procedure waits; the run that says so ends (or, without a deployment, blocks)."""
    with session_scope(engine) as session:
        row = session.get(Procedure, procedure_id)
        if row is None:
            raise LookupError(f"procedure #{procedure_id} does not exist")
        if row.wait_key != key or row.state != ProcedureState.WAITING:
            row.wait_since = now  # a run replaying the same wait keeps its first "since"
        row.state = ProcedureState.WAITING
        row.wait_key = key
        row.waiting_for = waiting_for
        row.wait_until = until
        row.approval_id = approval_id
        row.woken_at = None
        row.updated_at = now
        session.add(row)
        session.commit()


def resumed(engine: Engine, procedure_id: int, *, now: datetime) -> None:
    """The wait is over and a run goes on with the procedure."""
    with session_scope(engine) as session:
        session.exec(
            update(Procedure)
            .where(col(Procedure.id) == procedure_id, col(Procedure.state).in_(ProcedureState.OPEN))
            .values(
                state=ProcedureState.RUNNING,
                waiting_for=None,
                wait_key=None,
                wait_since=None,
                wait_until=None,
                updated_at=now,
            )
        )
        session.commit()


def finish(
    engine: Engine, procedure_id: int, outcome: dict, *, now: datetime, failed: bool = False
) -> None:
    with session_scope(engine) as session:
        row = session.get(Procedure, procedure_id)
        if row is None or row.state not in ProcedureState.OPEN:
            return  # another run of it finished first
        row.state = ProcedureState.FAILED if failed else ProcedureState.FINISHED
        row.outcome = outcome
        row.waiting_for = row.wait_key = None
        row.wait_since = row.wait_until = None
        row.finished_at = row.updated_at = now
        session.add(row)
        session.commit()


def due(engine: Engine, now: datetime, *, stuck_before: datetime | None = None) -> list[Procedure]:
    """Procedures the sweep must see to: waiting ones whose approval is answered or past its
    expiry, or whose time has come; and, with stuck_before, running ones that have not moved
    since then (their process was killed mid-step). One indexed query; nothing is written."""
    waiting_done = (Procedure.state == ProcedureState.WAITING) & or_(
        col(Procedure.wait_until) <= now,
        (col(Procedure.approval_id).is_not(None)) & (Approval.state != "pending"),
    )
    condition = waiting_done
    if stuck_before is not None:
        condition = or_(
            waiting_done,
            (Procedure.state == ProcedureState.RUNNING)
            & (col(Procedure.updated_at) <= stuck_before),
        )
    with session_scope(engine) as session:
        return list(
            session.exec(
                select(Procedure)
                .outerjoin(Approval, col(Approval.id) == Procedure.approval_id)
                .where(condition)
                .order_by(col(Procedure.id))
            ).all()
        )


def woken(engine: Engine, procedure_id: int, *, flow_run_id: str | None, now: datetime) -> None:
    """A run was asked to continue it (a resume, or a new run when the old one is gone)."""
    values: dict = {"woken_at": now, "wakes": col(Procedure.wakes) + 1, "updated_at": now}
    if flow_run_id is not None:
        values["flow_run_id"] = flow_run_id
    with session_scope(engine) as session:
        session.exec(update(Procedure).where(col(Procedure.id) == procedure_id).values(**values))
        session.commit()


def open_procedures(engine: Engine, *, limit: int = 100) -> Page[Waiting]:
    """Procedures still running or waiting: the soonest deadline first, then the oldest."""
    open_ = col(Procedure.state).in_(ProcedureState.OPEN)
    with session_scope(engine) as session:
        total = session.exec(select(func.count()).select_from(Procedure).where(open_)).one()
        rows = session.exec(
            select(Procedure)
            .where(open_)
            .order_by(
                col(Procedure.wait_until).is_(None), col(Procedure.wait_until), col(Procedure.id)
            )
            .limit(limit)
        ).all()
        return Page(
            [
                Waiting(
                    id=row.id or 0,
                    name=row.name,
                    subject=row.subject,
                    state=row.state,
                    waiting_for=row.waiting_for,
                    since=as_utc(row.wait_since) if row.wait_since else None,
                    until=as_utc(row.wait_until) if row.wait_until else None,
                    flow_run_id=row.flow_run_id,
                    runbook=f"{row.runbook_id} {row.runbook_version}",
                )
                for row in rows
            ],
            total,
        )
