"""`axiom sandbox reset` and the sandbox clock: the relay's protective state and time back to clean.

The sandbox may import models and config only (DESIGN.md, "Layout"), so the relay-side reset
works on the tables directly, with the conventions protocol/verbs.py documents: a recipient
the relay postponed because of a state (a suspension, a throttle's pacing) has a last_reply
starting "waiting: " or "paced: "; waking it moves its next attempt to now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, or_, update
from sqlmodel import Session, col, select

from models import Recipient, RecipientState, Suspension
from models.audit import as_utc
from models.audit_trail import record
from models.sandbox_clock import CLOCK_ROW, SandboxClock, read_offset

ACTOR = "cli"
REASON = "sandbox reset"
POSTPONED = ("waiting: %", "paced: %")  # protocol/verbs.py: WAITING, PACED


@dataclass
class RelayReset:
    suspensions_lifted: list[dict] = field(default_factory=list)
    woken: int = 0  # held recipients (behind a suspension or throttle) due now
    retries_moved: int = 0  # deferred recipients whose due time moved back with the clock
    offset_was: float = 0.0


def reset_relay(engine: Engine, now: datetime) -> RelayReset:
    """End every active suspension and throttle (audited), wake the mail they held, and put
    the sandbox clock back to the present; `now` is the present (system) time.

    Time going back would leave anything set at the advanced time far in the future: a
    suspension created then (ended here anyway) and a deferral's next attempt. A deferred
    recipient keeps the wait it had left: its due time moves back by the offset removed.
    """
    result = RelayReset(offset_was=read_offset(engine))
    back = timedelta(seconds=result.offset_was)
    with Session(engine, expire_on_commit=False) as session:
        for row in session.exec(
            select(Suspension).where(Suspension.expires_at > now).order_by(col(Suspension.id))
        ).all():
            lifted = {
                "suspension_id": row.id,
                "action": row.action,
                "rule_id": row.rule_id,
                "was_until": as_utc(row.expires_at).isoformat(),
            }
            row.expires_at = now
            session.add(row)
            record(
                session,
                actor=ACTOR,
                action="suspension.lift",
                subject=f"path:{row.source_ip}/{row.provider}",
                evidence={"reason": REASON, **lifted},
                at=now,
            )
            result.suspensions_lifted.append(
                {"ip": row.source_ip, "provider": row.provider, **lifted}
            )
        queued_later = (
            Recipient.state == RecipientState.queued,
            Recipient.next_attempt_at > now,
        )
        postponed = or_(*(col(Recipient.last_reply).like(p) for p in POSTPONED))
        result.woken = session.execute(
            update(Recipient)
            .where(*queued_later, postponed)
            .values(next_attempt_at=now, updated_at=now)
        ).rowcount
        if back > timedelta(0):
            deferred = session.exec(select(Recipient).where(*queued_later, ~postponed)).all()
            for r in deferred:
                r.next_attempt_at = max(now, as_utc(r.next_attempt_at) - back)
                session.add(r)
            result.retries_moved = len(deferred)
        if result.offset_was or result.suspensions_lifted or result.woken:
            record(
                session,
                actor=ACTOR,
                action="sandbox.reset",
                subject="sandbox",
                evidence={
                    "reason": REASON,
                    "suspensions_lifted": len(result.suspensions_lifted),
                    "woken": result.woken,
                    "retries_moved": result.retries_moved,
                    "clock_offset_was_seconds": result.offset_was,
                },
                at=now,
            )
        clock = session.get(SandboxClock, CLOCK_ROW)
        if clock is not None and clock.offset_seconds:
            clock.offset_seconds, clock.changed_at = 0.0, now
            session.add(clock)
        session.commit()
    return result
