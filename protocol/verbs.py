"""What the operator verbs share: who acts and under which rules, and waking postponed mail.

A verb is done either by an operator at the CLI (`--as NAME`: that is the human act, allowed
to a registered operator holding a role of the verb's checkpoint kind; a refusal is audited)
or by a flow after its checkpoint was approved (actor `flow:<run id>`, the approver in the
evidence). Either way the service changes the state and writes its audit entry, naming
runbooks/operator-verbs.yaml, in the caller's transaction.

Waking: when the relay cannot send a recipient because of a state (a hold, a cap, a pause, a
suspension) it postpones it without an attempt: next_attempt_at moves to the state's end or
capped_wait_seconds ahead, attempts stay, and last_reply says why, starting "waiting: " (or
"paced: " when a throttle's pacing wait was too long). A verb that lifts the state moves the
next attempt of exactly those recipients to now + wake_after_seconds, in its own transaction.
Deferred recipients (a receiver answered 4xx) keep their backoff: their last_reply is the
receiver's reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, exists, or_, tuple_, update
from sqlmodel import Session, select

from models import Message, Recipient, RecipientState, Stream
from models.audit_trail import record
from protocol.errors import ServiceError, operator_actor
from protocol.operators import permitted
from runbooks.loader import operator_verbs

# The prefixes of a postponement's last_reply (relay/delivery/engine.py, relay/spool/claims.py).
WAITING = "waiting: "
PACED = "paced: "


@dataclass(frozen=True)
class Act:
    """Who does a verb, why, and when; `evidence` joins the audit entry (approval, approver)."""

    actor: str
    reason: str
    now: datetime
    evidence: dict = field(default_factory=dict)

    def audit(self, session: Session, verb: str, subject: str, evidence: dict) -> None:
        rules = operator_verbs()
        record(
            session,
            actor=self.actor,
            action=verb,
            subject=subject,
            evidence={"reason": self.reason, **self.evidence, **evidence},
            runbook_id=rules.id,
            runbook_version=rules.version,
            at=self.now,
        )


def by_flow(run_id: str, reason: str, now: datetime, approval_id: int, approved_by: str) -> Act:
    """A flow acting after its checkpoint was approved."""
    return Act(
        actor=f"flow:{run_id}",
        reason=reason,
        now=now,
        evidence={"approval_id": approval_id, "approved_by": approved_by},
    )


def by_operator(session: Session, name: str, verb: str, subject: str, reason: str, now) -> Act:
    """An operator at the CLI: allowed when registered with a role of the verb's checkpoint
    kind (runbooks/checkpoints.yaml); a refusal is audited and committed, then raised."""
    if not name.strip():
        raise ServiceError("--as must name the operator")
    if len(reason.strip()) < 3:
        raise ServiceError("--reason must say why (3 characters or more)")
    kind = operator_verbs().spec.verb(verb).checkpoint
    operator, refusal = permitted(session, name, kind, verb)
    if operator is not None:
        return Act(actor=operator_actor(operator.name), reason=reason.strip(), now=now)
    Act(actor=operator_actor(name.strip()), reason=reason, now=now).audit(
        session, f"{verb}.refused", subject, {"detail": refusal}
    )
    # The caller rolls back on ServiceError; the refusal must outlive that, and nothing else
    # has been written in this transaction (the checks above only read).
    session.commit()
    raise ServiceError(f"refused: {refusal}")


def wake_at(now: datetime) -> datetime:
    return now + timedelta(seconds=operator_verbs().spec.wake_after_seconds)


def wake(
    session: Session,
    now: datetime,
    *,
    messages: ColumnElement[bool] | None = None,
    reply_like: list[str] | None = None,
    until: datetime | None = None,
) -> int:
    """Bring forward the next attempt of queued recipients postponed by a state that was just
    lifted: those whose last_reply matches one of reply_like (default: any postponement), of
    the messages `messages` selects, due later than the new time. Returns how many."""
    when = until or wake_at(now)
    patterns = reply_like or [f"{WAITING}%"]
    conditions = [
        Recipient.state == RecipientState.queued,
        Recipient.next_attempt_at > when,
        or_(*(Recipient.last_reply.like(p) for p in patterns)),
    ]
    if messages is not None:
        conditions.append(
            Recipient.message_id.in_(select(Message.id).where(messages).scalar_subquery())
        )
    result = session.connection().execute(
        update(Recipient).where(*conditions).values(next_attempt_at=when)
    )
    return result.rowcount


def of_tenant(tenant_id: int) -> ColumnElement[bool]:
    return Message.tenant_id == tenant_id


def of_stream(tenant_id: int, stream: str) -> ColumnElement[bool]:
    return and_(Message.tenant_id == tenant_id, Message.stream == stream)


def of_pool(pool_id: int, default_pool_id: int | None) -> ColumnElement[bool]:
    """Messages of the streams that send from pool_id (as their pool or their overflow); when
    it is the default pool, also those of streams without a binding, which use it."""
    bound = select(Stream.tenant_id, Stream.name).where(
        or_(Stream.pool_id == pool_id, Stream.fallback_pool_id == pool_id)
    )
    condition = tuple_(Message.tenant_id, Message.stream).in_(bound)
    if pool_id == default_pool_id:
        unbound = ~exists().where(
            Stream.tenant_id == Message.tenant_id, Stream.name == Message.stream
        )
        condition = or_(condition, unbound)
    return condition
