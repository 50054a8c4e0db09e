"""Complaint reports (ARF) the inbound listener recorded, read back from the audit trail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, func, select

from models import AuditEntry
from protocol.errors import ServiceError
from protocol.listing import Page

# relay/inbound/feedback.py audits each report under one of these actions.
REPORT_ACTIONS = ("complaint.received", "feedback.received")


@dataclass(frozen=True)
class ComplaintReport:
    at: datetime
    provider: str | None
    feedback_type: str | None
    recipients: list[str]
    suppressed: list[str]
    queue_id: str | None  # None: about mail that never went through us
    tenant_id: int | None
    user_agent: str | None


def complaint_reports(session: Session, limit: int) -> Page[ComplaintReport]:
    """The newest `limit` reports, oldest of them first."""
    if limit < 1:
        raise ServiceError(f"--limit must be 1 or more, got {limit}")
    is_report = col(AuditEntry.action).in_(REPORT_ACTIONS)
    total = session.exec(select(func.count()).select_from(AuditEntry).where(is_report)).one()
    entries = session.exec(
        select(AuditEntry).where(is_report).order_by(col(AuditEntry.id).desc()).limit(limit)
    ).all()
    reports = [
        ComplaintReport(
            at=e.at,
            provider=e.evidence.get("provider"),
            feedback_type=e.evidence.get("feedback_type"),
            recipients=e.evidence.get("recipients", []),
            suppressed=e.evidence.get("suppressed", []),
            queue_id=e.evidence.get("queue_id"),
            tenant_id=e.evidence.get("tenant_id"),
            user_agent=e.evidence.get("user_agent"),
        )
        for e in reversed(entries)
    ]
    return Page(reports, total)
