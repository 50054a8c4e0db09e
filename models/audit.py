"""The append-only, hash-chained audit trail: every action, automatic or human."""

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field


class AuditEntry(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = created_at_field()
    actor: str = Field(max_length=128)  # "operator:alice", "relay:auth-lockout", "flow:<run id>"
    action: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=255, index=True)
    runbook_id: str | None = Field(default=None, max_length=64)
    runbook_version: str | None = Field(default=None, max_length=32)
    evidence: dict = json_field()
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


GENESIS = "0" * 64


def as_utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back naive; they were written as UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def entry_digest(prev_hash: str, entry: AuditEntry) -> str:
    """SHA-256 over the previous hash and this entry's content, canonically serialised."""
    import hashlib
    import json

    body = {
        "at": as_utc(entry.at).isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "runbook_id": entry.runbook_id,
        "runbook_version": entry.runbook_version,
        "evidence": entry.evidence,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()
