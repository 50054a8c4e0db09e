"""Appending to and verifying the hash-chained audit trail; the caller owns the commit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text
from sqlmodel import Session, col, select

from models.audit import GENESIS, AuditEntry, entry_digest


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    evidence: dict | None = None,
    runbook_id: str | None = None,
    runbook_version: str | None = None,
    at: datetime | None = None,
) -> AuditEntry:
    """Append one entry linked to the newest one, inside the caller's transaction."""
    _serialise_appends(session)
    last = session.exec(select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(1)).first()
    entry = AuditEntry(
        at=at or datetime.now(UTC),
        actor=actor,
        action=action,
        subject=subject,
        runbook_id=runbook_id,
        runbook_version=runbook_version,
        # Round-trip through JSON so the hash covers exactly what the database will return.
        evidence=json.loads(json.dumps(evidence or {}, default=str)),
        prev_hash=last.hash if last else GENESIS,
        hash="",
    )
    entry.hash = entry_digest(entry.prev_hash, entry)
    session.add(entry)
    session.flush()
    return entry


def _serialise_appends(session: Session) -> None:
    # Two writers reading the same "last" entry would fork the chain. SQLite's write lock is
    # already held (BEGIN IMMEDIATE); PostgreSQL needs an explicit transaction-scoped lock.
    if session.get_bind().dialect.name == "postgresql":
        session.exec(text("SELECT pg_advisory_xact_lock(7311)"))


@dataclass
class ChainBreak:
    entry_id: int
    reason: str


def verify(session: Session) -> tuple[int, ChainBreak | None]:
    """Recompute the chain; returns (entries checked, first break or None)."""
    prev = GENESIS
    count = 0
    for entry in session.exec(select(AuditEntry).order_by(col(AuditEntry.id))):
        count += 1
        if entry.prev_hash != prev:
            return count, ChainBreak(entry.id, "prev_hash does not match the previous entry")
        if entry_digest(prev, entry) != entry.hash:
            return count, ChainBreak(entry.id, "content does not match its hash")
        prev = entry.hash
    return count, None
