"""Protective suspensions and throttles of (IP, provider) paths: the active ones, and lifting or
shortening one by a person's decision (the relay writes them; only people end them early)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, select

from models import Suspension
from models.audit import as_utc
from protocol.egress import get_ip
from protocol.errors import ServiceError
from protocol.verbs import PACED, WAITING, Act, wake
from relay.delivery.classify import rules as classification
from relay.delivery.egress import ALL_PROVIDERS


def active_suspensions(session: Session, now: datetime) -> list[Suspension]:
    """Soonest to expire first."""
    return list(
        session.exec(
            select(Suspension)
            .where(Suspension.expires_at > now)
            .order_by(col(Suspension.expires_at))
        ).all()
    )


def get_suspension(session: Session, suspension_id: int) -> Suspension:
    row = session.get(Suspension, suspension_id)
    if row is None:
        raise ServiceError(f"suspension {suspension_id} does not exist (see `axiom suspensions`)")
    return row


def _still_active(row: Suspension, now: datetime) -> datetime:
    expires = as_utc(row.expires_at)
    if expires <= now:
        raise ServiceError(
            f"suspension {row.id} of {row.source_ip} for {row.provider} already ended "
            f"at {expires:%Y-%m-%d %H:%M:%S}Z"
        )
    return expires


def _postponed_by(row: Suspension) -> list[str]:
    """The last_reply patterns of mail this suspension (or throttle) postponed."""
    provider = "%" if row.provider == ALL_PROVIDERS else row.provider
    if row.action == "suspend":
        return [f"{WAITING}%{row.source_ip} suspended for {provider} until%"]
    return [f"{PACED}{provider} via {row.source_ip}"]


def lift_suspension(session: Session, suspension_id: int, act: Act) -> tuple[Suspension, int]:
    """End an active suspension or throttle now (its row stays, expiring now, for the record)
    and wake the mail it postponed. Returns the row and how many recipients were woken."""
    row = get_suspension(session, suspension_id)
    was_until = _still_active(row, act.now)
    row.expires_at = act.now
    session.add(row)
    session.flush()
    woken = wake(session, act.now, reply_like=_postponed_by(row))
    act.audit(
        session,
        "suspension.lift",
        f"path:{row.source_ip}/{row.provider}",
        {
            "suspension_id": row.id,
            "was_until": was_until.isoformat(),
            "woken": woken,
            **_described(row),
        },
    )
    return row, woken


def shorten_suspension(
    session: Session, suspension_id: int, until: datetime, act: Act
) -> tuple[Suspension, int]:
    """Bring an active suspension's expiry forward to `until` (later than now, earlier than
    its expiry); the mail it postponed past `until` falls due then."""
    row = get_suspension(session, suspension_id)
    was_until = _still_active(row, act.now)
    until = as_utc(until)
    if until <= act.now:
        raise ServiceError(
            f"--until {until:%Y-%m-%d %H:%M:%S}Z is not in the future; to end it now, lift it"
        )
    if until >= was_until:
        raise ServiceError(
            f"suspension {row.id} already ends at {was_until:%Y-%m-%d %H:%M:%S}Z; shortening "
            f"cannot move it to {until:%Y-%m-%d %H:%M:%S}Z"
        )
    row.expires_at = until
    session.add(row)
    session.flush()
    woken = wake(session, act.now, reply_like=_postponed_by(row), until=until)
    act.audit(
        session,
        "suspension.shorten",
        f"path:{row.source_ip}/{row.provider}",
        {
            "suspension_id": row.id,
            "was_until": was_until.isoformat(),
            "until": until.isoformat(),
            "woken": woken,
            **_described(row),
        },
    )
    return row, woken


def throttle_path(
    session: Session,
    source_ip: str,
    provider: str,
    per_minute: int,
    until: datetime,
    act: Act,
    rule_id: str | None = None,
) -> Suspension:
    """Slow one (IP, provider) path to `per_minute` until `until`: a throttle the relay honours
    like its own reactions' (the lowest active limit wins), protective and ending by itself.
    Lowering a rate is the one action machines may take alone (the triage runbook's
    lower_rate); a person does it with `axiom suspension throttle`."""
    if per_minute < 1:
        raise ServiceError(f"--per-minute must be 1 or more, not {per_minute}")
    source_ip = get_ip(session, source_ip).address
    known = sorted(
        {p for _, p in classification().mx_suffixes} | {classification().fallback_provider}
    )
    if provider not in known:
        raise ServiceError(f"provider {provider!r} is not one of {', '.join(known)}")
    until = as_utc(until)
    if until <= act.now:
        raise ServiceError(f"a throttle must end later than now, not at {until.isoformat()}")
    row = Suspension(
        source_ip=source_ip,
        provider=provider,
        action="throttle",
        limit_per_minute=per_minute,
        reason=act.reason[:1000],
        rule_id=rule_id,
        created_at=act.now,
        expires_at=until,
    )
    session.add(row)
    session.flush()
    act.audit(
        session,
        "path.throttle",
        f"path:{source_ip}/{provider}",
        {"suspension_id": row.id, "until": until.isoformat(), **_described(row)},
    )
    return row


def _described(row: Suspension) -> dict:
    return {
        "action": row.action,
        "limit_per_minute": row.limit_per_minute,
        "rule_id": row.rule_id,
        "why_suspended": row.reason,
    }
