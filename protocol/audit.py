"""The audit trail as operators read it: the newest entries, and whether the hash chain holds."""

from __future__ import annotations

from sqlmodel import Session, col, func, select

from models import AuditEntry
from models.audit_trail import ChainBreak, verify
from protocol.errors import ServiceError
from protocol.listing import Page


def recent_entries(session: Session, limit: int) -> Page[AuditEntry]:
    """The newest `limit` entries, oldest of them first (the order they were written)."""
    if limit < 1:
        raise ServiceError(f"--limit must be 1 or more, got {limit}")
    total = session.exec(select(func.count()).select_from(AuditEntry)).one()
    newest = session.exec(select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)).all()
    return Page(list(reversed(newest)), total)


def verify_trail(session: Session) -> int:
    """How many entries were verified; ServiceError naming the first broken one."""
    count, broken = verify(session)
    if broken is not None:
        raise ServiceError(_describe(broken))
    return count


def _describe(broken: ChainBreak) -> str:
    return f"audit chain broken at entry {broken.entry_id}: {broken.reason}"
