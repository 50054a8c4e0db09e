"""DKIM key rotation: new keys under new selectors, the switch, the overlap, the retirement.

A key's life: pending (published, not signing) → active (signing) → retiring (not signing,
still published, so mail signed before the switch and still in flight verifies) → retired
(withdrawn from the records). The relay signs with the active keys, re-read within its key
cache time (relay/submission/policy.py, 60 s): the switch needs no restart. Each function
writes in the caller's transaction (a procedure step) with its audit entry.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlmodel import Session, col, func, select

from models import DkimKey, Domain, DomainState, KeyState
from models.audit_trail import record
from protocol.domains import get_domain, keys_in, new_keys
from protocol.errors import ServiceError
from relay.submission.keystore import KeyBox

Runbook = tuple[str, str]  # (id, version) for the audit entries


def due(session: Session, *, now: datetime, rotate_after_days: int, limit: int) -> list[str]:
    """Active domains whose newest active key has signed for rotate_after_days, and with no
    rotation under way (no pending key): one query, the scheduled run's whole cost when none."""
    newest = (
        select(DkimKey.domain_id, func.max(func.coalesce(DkimKey.activated_at, DkimKey.created_at)))
        .where(DkimKey.state == KeyState.active)
        .group_by(DkimKey.domain_id)
        .subquery()
    )
    pending = select(DkimKey.domain_id).where(DkimKey.state == KeyState.pending)
    rows = session.exec(
        select(Domain.name, newest.c[1])
        .join(newest, newest.c.domain_id == Domain.id)
        .where(
            Domain.state == DomainState.active,
            col(Domain.id).not_in(pending),
        )
        .order_by(Domain.name)
    ).all()
    cutoff = now - timedelta(days=rotate_after_days)
    return [name for name, since in rows if _aware(since) <= cutoff][:limit]


def begin(
    session: Session,
    keybox: KeyBox,
    domain_name: str,
    *,
    now: datetime,
    actor: str,
    runbook: Runbook,
) -> dict:
    """New pending keys (or those an unfinished rotation made); which keys they replace."""
    domain = get_domain(session, domain_name)
    if domain.state != DomainState.active:
        raise ServiceError(f"domain {domain.name!r} is {domain.state}: only active domains rotate")
    old = keys_in(session, domain, KeyState.active)
    new = keys_in(session, domain, KeyState.pending) or new_keys(session, keybox, domain, now=now)
    record(
        session,
        actor=actor,
        action="dkim.rotation.begin",
        subject=f"domain:{domain.name}",
        evidence={"new": [k.selector for k in new], "old": [k.selector for k in old]},
        runbook_id=runbook[0],
        runbook_version=runbook[1],
        at=now,
    )
    return {"new": [k.selector for k in new], "old": [k.selector for k in old]}


def switch(
    session: Session,
    domain_name: str,
    new: list[str],
    *,
    now: datetime,
    overlap_days: int,
    actor: str,
    runbook: Runbook,
    approval_id: int,
    approved_by: str,
) -> dict:
    """The new keys sign; the old ones retire after the overlap (still published until then)."""
    domain = get_domain(session, domain_name)
    pending = {k.selector: k for k in keys_in(session, domain, KeyState.pending)}
    missing = sorted(set(new) - set(pending))
    if missing:
        raise ServiceError(f"keys {', '.join(missing)} of {domain.name} are no longer pending")
    retire_at = now + timedelta(days=overlap_days)
    old = keys_in(session, domain, KeyState.active)
    for key in old:
        key.state, key.retire_at = KeyState.retiring, retire_at
        session.add(key)
    for selector in new:
        key = pending[selector]
        key.state, key.activated_at = KeyState.active, now
        session.add(key)
    record(
        session,
        actor=actor,
        action="dkim.switch",
        subject=f"domain:{domain.name}",
        evidence={
            "signing": new,
            "retiring": [k.selector for k in old],
            "retire_at": retire_at.isoformat(),
            "approval_id": approval_id,
            "approved_by": approved_by,
        },
        runbook_id=runbook[0],
        runbook_version=runbook[1],
        at=now,
    )
    return {
        "signing": new,
        "retiring": [k.selector for k in old],
        "retire_at": retire_at.isoformat(),
    }


def withdraw(
    session: Session,
    domain_name: str,
    new: list[str],
    *,
    now: datetime,
    actor: str,
    why: str,
    runbook: Runbook,
) -> dict:
    """A rotation that did not happen (rejected, DNS never showed the keys): its pending keys
    are retired, so they are no longer asked of the customer; the old keys keep signing."""
    domain = get_domain(session, domain_name)
    withdrawn = [k for k in keys_in(session, domain, KeyState.pending) if k.selector in new]
    for key in withdrawn:
        key.state = KeyState.retired
        session.add(key)
    record(
        session,
        actor=actor,
        action="dkim.rotation.withdrawn",
        subject=f"domain:{domain.name}",
        evidence={"withdrawn": [k.selector for k in withdrawn], "why": why},
        runbook_id=runbook[0],
        runbook_version=runbook[1],
        at=now,
    )
    return {"withdrawn": [k.selector for k in withdrawn]}


def retire(
    session: Session, domain_name: str, *, now: datetime, actor: str, runbook: Runbook
) -> dict:
    """Retiring keys whose overlap is over are withdrawn: their records may go."""
    domain = get_domain(session, domain_name)
    done = [
        k
        for k in keys_in(session, domain, KeyState.retiring)
        if k.retire_at is not None and _aware(k.retire_at) <= now
    ]
    for key in done:
        key.state = KeyState.retired
        session.add(key)
    if done:
        record(
            session,
            actor=actor,
            action="dkim.retire",
            subject=f"domain:{domain.name}",
            evidence={"retired": [k.selector for k in done]},
            runbook_id=runbook[0],
            runbook_version=runbook[1],
            at=now,
        )
    return {
        "retired": [k.selector for k in done],
        "records": [
            {"name": f"{k.selector}._domainkey.{domain.name}", "type": "TXT"} for k in done
        ],
    }


def _aware(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)
