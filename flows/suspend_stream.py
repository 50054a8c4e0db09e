"""Runbook "suspend a stream": hold one tenant stream's outgoing mail once a person approves.

The hold is state the relay already honours: the stream is bound to the pool `hold`, which
has no addresses, so egress finds no source IP and the stream's mail waits in the spool
("waiting: pool hold has no IP addresses"), retried every capped_wait_seconds and still aging
toward the delivery runbook's maximum age. Submission goes on; other streams are untouched.
To release it an operator binds the stream to a pool again (`axiom stream set TENANT STREAM
--pool POOL`); the pool it left is in the outcome and in the audit entry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field
from sqlmodel import Session

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, ProcedureRun, procedure
from models.egress import HOLD_POOL
from notifications import customer_mail
from protocol import egress
from protocol.errors import ServiceError
from protocol.verbs import Act
from runbooks.loader import suspend_stream as rules


class StreamState(BaseModel):
    tenant: str
    stream: str
    pool: str | None
    fallback_pool: str | None
    queued_recipients: int

    @property
    def held(self) -> bool:
        return self.pool == HOLD_POOL


class StreamHoldOutcome(BaseModel):
    """What the run did, for the UI and for scripts."""

    outcome: Literal["held", "not_held", "dry_run", "already_held"]
    tenant: str
    stream: str
    approval_id: int | None = None
    decision: str | None = None
    decided_by: str | None = None
    previous_pool: str | None = None
    previous_fallback_pool: str | None = None
    queued_recipients: int = 0
    release_with: str | None = None
    notice: dict | None = None  # what the customer was told (notifications/customer_mail.py)


def read_stream(session: Session, tenant: str, stream: str) -> StreamState:
    """The stream as the relay sees it now (a stream without a row uses the default pool)."""
    try:
        return StreamState(**egress.stream_binding(session, tenant, stream))
    except ServiceError as exc:
        raise ValueError(str(exc)) from None


def hold_stream(
    session: Session,
    state: StreamState,
    approval_id: int,
    approved_by: str,
    reason: str,
    actor: str,
) -> dict:
    """Bind the stream to the empty `hold` pool (protocol/egress.py hold_stream), audited with
    who approved and what it left. Runs in the procedure's step transaction (done once however
    often the run starts)."""
    governing = rules()  # this procedure's runbook: every audit entry names it
    act = Act(
        actor=actor,
        reason=reason,
        now=datetime.now(UTC),
        evidence={"approval_id": approval_id, "approved_by": approved_by, "flow": "suspend-stream"},
    )
    try:
        egress.hold_stream(
            session, state.tenant, state.stream, act, (governing.id, governing.version)
        )
    except ServiceError as exc:
        raise RuntimeError(str(exc)) from None
    return {"held": f"{state.tenant}/{state.stream}"}


@flow(name="suspend-stream", log_prints=False)
def suspend_stream(
    tenant: str,
    stream: str,
    reason: Annotated[str, Field(min_length=3)],
    dry_run: bool = False,
    procedure_id: ProcedureId = None,
) -> StreamHoldOutcome:
    """Propose holding a tenant stream's outgoing mail; do it only once a person approves.

    Args:
        tenant: The tenant (customer) name.
        stream: The stream, e.g. marketing or transactional.
        reason: Why; shown to the approver and kept in the audit trail.
        dry_run: Ask for approval but change nothing.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    logger = get_run_logger()
    settings = resources.settings()  # once for this run's process; steps get them passed in
    runbook = rules()
    subject = f"stream:{tenant}/{stream}"
    with procedure(runbook, subject=subject, procedure_id=procedure_id, settings=settings) as p:
        state = StreamState(
            **p.step("read", lambda session: read_stream(session, tenant, stream).model_dump())
        )
        base = {"tenant": tenant, "stream": stream, "queued_recipients": state.queued_recipients}
        if state.held:
            logger.info("%s/%s is already held; nothing to do", tenant, stream)
            return _finish(p, StreamHoldOutcome(outcome="already_held", **base))
        release = f"axiom stream set {tenant} {stream} --pool {state.pool}" + (
            f" --fallback {state.fallback_pool}" if state.fallback_pool else ""
        )
        decision = request_approval(
            kind=runbook.spec.checkpoint,
            subject=subject,
            proposal={
                "action": f"hold all outgoing mail of {tenant}/{stream} (bind it to pool {HOLD_POOL})",
                "reason": reason,
                "release with": release,
                "dry run": dry_run,
            },
            evidence={
                "current pool": state.pool,
                "fallback pool": state.fallback_pool or "none",
                "queued recipients": state.queued_recipients,
            },
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        outcome = {
            **base,
            "approval_id": decision.approval_id,
            "decision": decision.outcome,
            "decided_by": decision.decided_by,
            "previous_pool": state.pool,
            "previous_fallback_pool": state.fallback_pool,
        }
        if not decision.approved:
            logger.info("not holding %s/%s: approval %s", tenant, stream, decision.outcome)
            return _finish(p, StreamHoldOutcome(outcome="not_held", **outcome))
        if dry_run:
            logger.info("dry run: %s/%s would now be held", tenant, stream)
            return _finish(p, StreamHoldOutcome(outcome="dry_run", **outcome))
        p.step(
            "hold",
            lambda session: hold_stream(
                session, state, decision.approval_id, decision.decided_by or "", reason, p.actor
            ),
        )
        logger.info("%s/%s is held; release with: %s", tenant, stream, release)
        notice = p.step(  # the mail is sent once; the step records what was sent
            "notify",
            lambda session: customer_mail.send_notice(
                session,
                settings,
                tenant,
                "email_stream_held",
                actor=p.actor,
                at=f"{p.now():%Y-%m-%d %H:%M} UTC",
                stream=stream,
                queued_recipients=state.queued_recipients,
            ),
        )
        logger.info("%s", notice["said"])
        return _finish(
            p, StreamHoldOutcome(outcome="held", release_with=release, notice=notice, **outcome)
        )


def _finish(p: ProcedureRun, outcome: StreamHoldOutcome) -> StreamHoldOutcome:
    p.finish(outcome.model_dump())
    return outcome
