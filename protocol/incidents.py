"""Incidents: one cause on one subject is one incident, with a state and a timeline.

A signal (a recurring reaction of the relay, a blocklist listing, a complaint spike — the
runbooks of the next issues add theirs) is reported with `report`: while an incident with the
same dedup key ("<cause>:<subject>") is not resolved, the signal joins its timeline and raises
its severity if it is worse; otherwise a new incident opens. People and procedures move it
through open → mitigating → monitoring → resolved (or escalated from any open state) with
`transition`, and add notes, actions and approvals to its timeline. Every change writes an
audit entry in the same transaction, and each timeline line names the entry that records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from models import AuditEntry, Incident, IncidentEvent, IncidentState
from models.audit_trail import record
from protocol.errors import ServiceError
from protocol.listing import Page

SEVERITIES = ("info", "warning", "critical")
KINDS = ("signal", "action", "approval", "note", "state")
UNRESOLVED = (
    IncidentState.OPEN,
    IncidentState.MITIGATING,
    IncidentState.MONITORING,
    IncidentState.ESCALATED,
)
# Where each state may go next; resolved is final (a recurrence opens a new incident).
NEXT: dict[str, set[str]] = {
    IncidentState.OPEN: {
        IncidentState.MITIGATING,
        IncidentState.MONITORING,
        IncidentState.RESOLVED,
        IncidentState.ESCALATED,
    },
    IncidentState.MITIGATING: {
        IncidentState.MONITORING,
        IncidentState.RESOLVED,
        IncidentState.ESCALATED,
    },
    IncidentState.MONITORING: {
        IncidentState.MITIGATING,
        IncidentState.RESOLVED,
        IncidentState.ESCALATED,
    },
    IncidentState.ESCALATED: {
        IncidentState.MITIGATING,
        IncidentState.MONITORING,
        IncidentState.RESOLVED,
    },
    IncidentState.RESOLVED: set(),
}


@dataclass(frozen=True)
class Reported:
    incident: Incident
    opened: bool  # a new incident, not a signal folded into an open one


def dedup_key(cause: str, subject: str) -> str:
    return f"{cause}:{subject}"


def report(
    session: Session,
    *,
    subject: str,
    cause: str,
    severity: str,
    summary: str,
    actor: str,
    now: datetime,
    evidence: dict | None = None,
    audit_entry_id: int | None = None,
    runbook_id: str | None = None,
    runbook_version: str | None = None,
) -> Reported:
    """Fold a signal into the open incident of its cause and subject, or open one.

    audit_entry_id: the entry that records the signal itself (e.g. the relay's suspension);
    without one, the report's own audit entry is the timeline's link.
    """
    if severity not in SEVERITIES:
        raise ServiceError(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    key = dedup_key(cause, subject)
    incident = _open_incident(session, key)
    opened = incident is None
    if incident is None:
        incident = Incident(
            key=key,
            open_key=key,
            subject=subject,
            cause=cause,
            severity=severity,
            summary=summary,
            evidence=evidence or {},
            runbook_id=runbook_id,
            runbook_version=runbook_version,
            opened_at=now,
            updated_at=now,
        )
        session.add(incident)
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:  # another writer opened it a moment ago: join theirs
            incident = _open_incident(session, key)
            assert incident is not None
            opened = False
    if not opened:
        incident.occurrences += 1
        if SEVERITIES.index(severity) > SEVERITIES.index(incident.severity):
            incident.severity = severity
        incident.summary = summary
        incident.evidence = {**incident.evidence, **(evidence or {})}
        incident.updated_at = now
        session.add(incident)
        session.flush()
    own = record(
        session,
        actor=actor,
        action="incident.opened" if opened else "incident.signal",
        subject=f"incident:{incident.id}",
        evidence={
            "key": key,
            "subject": subject,
            "severity": severity,
            "summary": summary,
            "signal_audit_entry": audit_entry_id,
        },
        runbook_id=runbook_id,
        runbook_version=runbook_version,
        at=now,
    )
    _event(session, incident, "signal", actor, summary, audit_entry_id or own.id, now)
    return Reported(incident, opened)


def transition(
    session: Session,
    incident_id: int,
    state: str,
    *,
    actor: str,
    note: str = "",
    now: datetime,
) -> Incident:
    incident = get(session, incident_id)
    if state not in IncidentState.ALL:
        raise ServiceError(f"state must be one of {', '.join(IncidentState.ALL)}, not {state!r}")
    if state not in NEXT[incident.state]:
        allowed = ", ".join(sorted(NEXT[incident.state])) or "nothing (it is final)"
        raise ServiceError(
            f"incident #{incident_id} is {incident.state}; it may go to {allowed}, not {state}"
        )
    before = incident.state
    incident.state = state
    incident.updated_at = now
    if state == IncidentState.RESOLVED:
        incident.open_key = None  # a recurrence opens a new incident
        incident.resolved_at = now
    session.add(incident)
    entry = record(
        session,
        actor=actor,
        action=f"incident.{state}",
        subject=f"incident:{incident.id}",
        evidence={"from": before, "to": state, "note": note},
        runbook_id=incident.runbook_id,
        runbook_version=incident.runbook_version,
        at=now,
    )
    text = f"{before} → {state}" + (f": {note}" if note else "")
    _event(session, incident, "state", actor, text, entry.id, now)
    return incident


def add_event(
    session: Session,
    incident_id: int,
    kind: str,
    *,
    actor: str,
    summary: str,
    now: datetime,
    audit_entry_id: int | None = None,
    approval_id: int | None = None,
) -> IncidentEvent:
    """A note, an action or an approval on the timeline. A note is audited here; an action or
    an approval names the audit entry that already records it."""
    if kind not in KINDS:
        raise ServiceError(f"timeline kind must be one of {', '.join(KINDS)}, not {kind!r}")
    incident = get(session, incident_id)
    if audit_entry_id is None:
        audit_entry_id = record(
            session,
            actor=actor,
            action=f"incident.{kind}",
            subject=f"incident:{incident.id}",
            evidence={"summary": summary, "approval_id": approval_id},
            runbook_id=incident.runbook_id,
            runbook_version=incident.runbook_version,
            at=now,
        ).id
    incident.updated_at = now
    session.add(incident)
    return _event(session, incident, kind, actor, summary, audit_entry_id, now, approval_id)


def get(session: Session, incident_id: int) -> Incident:
    incident = session.get(Incident, incident_id)
    if incident is None:
        raise ServiceError(f"incident #{incident_id} does not exist (`axiom incidents` lists them)")
    return incident


def timeline(session: Session, incident_id: int) -> list[IncidentEvent]:
    return list(
        session.exec(
            select(IncidentEvent)
            .where(IncidentEvent.incident_id == incident_id)
            .order_by(col(IncidentEvent.at), col(IncidentEvent.id))
        ).all()
    )


def listing(session: Session, *, include_resolved: bool = False, limit: int = 50) -> Page[Incident]:
    """Incidents, the most recently changed first; unresolved only unless asked."""
    where = [] if include_resolved else [col(Incident.state).in_(UNRESOLVED)]
    total = session.exec(select(func.count()).select_from(Incident).where(*where)).one()
    rows = session.exec(
        select(Incident)
        .where(*where)
        .order_by(col(Incident.updated_at).desc(), col(Incident.id).desc())
        .limit(limit)
    ).all()
    return Page(list(rows), total)


def audit_entries(session: Session, incident_id: int) -> list[AuditEntry]:
    """The audit entries its timeline links to, in order (to verify them or show them)."""
    ids = [e.audit_entry_id for e in timeline(session, incident_id) if e.audit_entry_id]
    if not ids:
        return []
    return list(
        session.exec(
            select(AuditEntry).where(col(AuditEntry.id).in_(ids)).order_by(col(AuditEntry.id))
        ).all()
    )


def _open_incident(session: Session, key: str) -> Incident | None:
    return session.exec(select(Incident).where(Incident.open_key == key)).first()


def _event(
    session: Session,
    incident: Incident,
    kind: str,
    actor: str,
    summary: str,
    audit_entry_id: int | None,
    now: datetime,
    approval_id: int | None = None,
) -> IncidentEvent:
    assert incident.id is not None
    event = IncidentEvent(
        incident_id=incident.id,
        at=now,
        kind=kind,
        actor=actor[:128],
        summary=summary,
        audit_entry_id=audit_entry_id,
        approval_id=approval_id,
    )
    session.add(event)
    session.flush()
    return event
