"""Incidents: one cause on one subject, its state, and the timeline of what touched it.

`key` is the dedup key ("<cause>:<subject>"); `open_key` holds it while the incident is not
resolved and NULL after, under a unique constraint: one open incident per cause and subject
(NULLs are distinct in SQLite and PostgreSQL alike, so resolved ones never collide), and a
recurrence after resolution opens a new one.
"""

from datetime import datetime

from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field, timestamp_field


class IncidentState:
    OPEN = "open"
    MITIGATING = "mitigating"
    MONITORING = "monitoring"
    RESOLVED = "resolved"
    ESCALATED = "escalated"

    ALL = (OPEN, MITIGATING, MONITORING, RESOLVED, ESCALATED)


class Incident(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=255, index=True)
    open_key: str | None = Field(default=None, max_length=255, unique=True)
    subject: str = Field(max_length=255, index=True)  # ip:…, provider:…, domain:…, stream:t/s
    cause: str = Field(max_length=64)
    severity: str = Field(default="warning", max_length=16)  # info | warning | critical
    state: str = Field(default=IncidentState.OPEN, max_length=16, index=True)
    summary: str = ""
    evidence: dict = json_field()
    occurrences: int = 1  # signals folded into it
    runbook_id: str | None = Field(default=None, max_length=64)
    runbook_version: str | None = Field(default=None, max_length=32)
    slack_channel: str | None = Field(default=None, max_length=32)
    slack_ts: str | None = Field(default=None, max_length=32)  # its one message, updated
    opened_at: datetime = created_at_field()
    updated_at: datetime = created_at_field()
    resolved_at: datetime | None = timestamp_field()


class IncidentEvent(SQLModel, table=True):
    """One line of an incident's timeline, linked to the audit entry that records it."""

    __tablename__ = "incident_event"

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(foreign_key="incident.id", index=True)
    at: datetime = created_at_field()
    kind: str = Field(max_length=16)  # signal | action | approval | note | state
    actor: str = Field(max_length=128)
    summary: str = ""
    audit_entry_id: int | None = Field(default=None, foreign_key="auditentry.id")
    approval_id: int | None = Field(default=None, foreign_key="approval.id")
