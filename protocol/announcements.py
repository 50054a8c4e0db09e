"""Say what the machine did: the relay's reactions, announced per subject and window, and
incidents when they recur (runbooks/reactions-watch.yaml).

The relay writes an audit entry for each automatic suspension or throttle of an (IP,
provider) path (relay/delivery/reactions.py) and announces nothing: it never calls Slack.
`read_reactions` takes the entries after the control cursor in one indexed query (an idle
run stops there). `record_reactions` then, in one transaction with the cursor's move — so
each entry is announced once whoever runs it — folds them per path into the open
announcement of the current window (or a new one), and reports an incident when the path has
recur_threshold reactions within recur_window_seconds. Slack and the Prefect artifacts come
after the commit (notifications/announce.py), from what was recorded here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from models import Announcement, AuditEntry, ControlCursor
from models.audit import as_utc
from models.db import session_scope
from protocol import incidents
from runbooks.schema_protocol import ReactionsWatchRunbook, ReactionsWatchSpec

CURSOR = "reactions-watch"
REACTIONS = ("path.suspend", "path.throttle")
CAUSE = "repeated-reactions"
BATCH = 500  # entries per run; a backlog drains over the next runs


@dataclass
class Recorded:
    read: int = 0
    announcements: list[int] = field(default_factory=list)
    incidents: list[int] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        return self.read == 0

    def as_json(self) -> dict:
        return {"read": self.read, "announcements": self.announcements, "incidents": self.incidents}


def read_reactions(engine: Engine) -> list[AuditEntry]:
    """Reaction entries after the cursor: one query; empty when there is nothing new."""
    after = (
        select(func.coalesce(func.max(ControlCursor.position), 0))
        .where(ControlCursor.name == CURSOR)
        .scalar_subquery()
    )
    with session_scope(engine) as session:
        return list(
            session.exec(
                select(AuditEntry)
                .where(col(AuditEntry.id) > after, col(AuditEntry.action).in_(REACTIONS))
                .order_by(col(AuditEntry.id))
                .limit(BATCH)
            ).all()
        )


def record_reactions(
    engine: Engine,
    entries: list[AuditEntry],
    rules: ReactionsWatchRunbook,
    *,
    actor: str,
    now: datetime,
) -> Recorded:
    result = Recorded(read=len(entries))
    if not entries:
        return result
    spec = rules.spec
    by_subject: dict[str, list[AuditEntry]] = defaultdict(list)
    for entry in entries:
        by_subject[entry.subject].append(entry)
    with session_scope(engine) as session:
        if not _advance(session, entries[0].id or 0, entries[-1].id or 0, now):
            session.rollback()  # another run read these first
            return Recorded()
        for subject, news in by_subject.items():
            announcement = _announcement(session, subject, now, spec.window_seconds)
            announcement.reactions += len(news)
            announcement.entries = [*announcement.entries, *(e.id for e in news)]
            announcement.summary = {
                "items": [*announcement.summary.get("items", []), *map(_item, news)]
            }
            announcement.updated_at = now
            session.add(announcement)
            session.flush()
            assert announcement.id is not None
            result.announcements.append(announcement.id)
            recent = _recent_reactions(
                session, subject, now - timedelta(seconds=spec.recur_window_seconds)
            )
            severity = decide(recent, spec)
            if severity is None:
                continue
            hours = spec.recur_window_seconds // 3600
            for entry in news:
                reported = incidents.report(
                    session,
                    subject=subject,
                    cause=CAUSE,
                    severity=severity,
                    summary=f"{recent} automatic reactions in {hours} h; latest: {_item(entry)['action']} "
                    f"by rule {_item(entry)['rule']}",
                    actor=actor,
                    now=now,
                    evidence={"reactions_in_window": recent, "window_hours": hours},
                    audit_entry_id=entry.id,
                    runbook_id=rules.id,
                    runbook_version=rules.version,
                )
                assert reported.incident.id is not None
                if reported.incident.id not in result.incidents:
                    result.incidents.append(reported.incident.id)
            announcement.summary = {**announcement.summary, "incident_id": result.incidents[-1]}
            session.add(announcement)
        session.commit()
    return result


def decide(recent: int, spec: ReactionsWatchSpec) -> str | None:
    """The incident a path's recent reactions call for: none, warning or critical."""
    if recent < spec.recur_threshold:
        return None
    return "critical" if recent >= spec.critical_threshold else "warning"


def _advance(session: Session, first: int, last: int, now: datetime) -> bool:
    """Move the cursor past `last` if it still stands before `first` (compare and set)."""
    cursor = session.get(ControlCursor, CURSOR, with_for_update=True)  # one run at a time
    if cursor is None:
        session.add(ControlCursor(name=CURSOR, position=last, updated_at=now))
        session.flush()
        return True
    if cursor.position >= first:
        return False
    cursor.position, cursor.updated_at = last, now
    session.add(cursor)
    return True


def _announcement(session: Session, subject: str, now: datetime, window: int) -> Announcement:
    current = session.exec(
        select(Announcement)
        .where(
            Announcement.subject == subject,
            col(Announcement.window_start) > now - timedelta(seconds=window),
        )
        .order_by(col(Announcement.window_start).desc())
    ).first()
    return current or Announcement(
        subject=subject, window_start=now, created_at=now, updated_at=now
    )


def _recent_reactions(session: Session, subject: str, since: datetime) -> int:
    return session.exec(
        select(func.count())
        .select_from(AuditEntry)
        .where(
            AuditEntry.subject == subject,
            col(AuditEntry.action).in_(REACTIONS),
            col(AuditEntry.at) >= since,
        )
    ).one()


def _item(entry: AuditEntry) -> dict:
    """What a message shows of one reaction."""
    evidence = entry.evidence or {}
    duration = int(evidence.get("duration_seconds") or 0)
    at = as_utc(entry.at)
    return {
        "audit_entry_id": entry.id,
        "at": f"{at:%H:%M}",
        "action": entry.action.removeprefix("path."),
        "rule": entry.actor.removeprefix("relay:reaction:"),
        "limit_per_minute": evidence.get("limit_per_minute"),
        "until": f"{at + timedelta(seconds=duration):%H:%M}",
        "reply": str(evidence.get("reply", ""))[:200],
    }
