"""Slack messages kept up to date: a run of the relay's reactions, and each incident.

Both are one message edited in place (SlackNotifier.message): the ids of the posted message are
stored on the row the first time and chat.update is used after. What they show is read back
from the database, so the message is what `axiom incidents show` shows. A Slack outage is
logged and costs nothing else: the rows are already committed, and the next change posts again.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, update
from sqlmodel import col

from models import Announcement, Incident
from models.audit import as_utc
from models.db import session_scope
from notifications.slack import SlackNotifier
from notifications.templates import render
from protocol import incidents
from protocol.approvals import NotifierUnavailable, Posted

log = logging.getLogger("axiom.announce")

SLACK_TIMELINE = 8  # the newest entries a Slack message shows; the artifact has them all
CAUSES = {
    "en": {
        "repeated-reactions": "repeated protective reactions",
        "dns-broken": "DNS records broken",
        "dmarc-failing": "our mail failing DMARC",
    },
    "it": {
        "repeated-reactions": "reazioni protettive ripetute",
        "dns-broken": "record DNS non corretti",
        "dmarc-failing": "la nostra posta non supera DMARC",
    },
}


def cause_text(cause: str, language: str) -> str:
    return CAUSES.get(language, {}).get(cause, cause)


def announce_reactions(engine: Engine, notifier: SlackNotifier | None, ids: list[int]) -> int:
    """Post or update the Slack message of each announcement; how many got through."""
    if notifier is None:
        return 0
    done = 0
    for announcement_id in ids:
        with session_scope(engine) as session:
            row = session.get(Announcement, announcement_id)
            if row is None:
                continue
            items = row.summary.get("items", [])
            context = dict(
                subject=row.subject,
                count=row.reactions,
                since=f"{as_utc(row.window_start):%H:%M}",
                reactions=items[-SLACK_TIMELINE:],
                incident_id=row.summary.get("incident_id"),
            )
            at = Posted(row.slack_channel, row.slack_ts) if row.slack_ts else None
        posted = _send(notifier, "slack_reactions", at, f"announcement #{announcement_id}", context)
        if posted is not None:
            _store(engine, Announcement, announcement_id, posted)
            done += 1
    return done


def publish_incident(engine: Engine, notifier: SlackNotifier | None, incident_id: int) -> bool:
    """Post or update the incident's one Slack message."""
    if notifier is None:
        return False
    with session_scope(engine) as session:
        incident = incidents.get(session, incident_id)
        context = incident_context(session, incident, notifier.language, limit=SLACK_TIMELINE)
        at = Posted(incident.slack_channel, incident.slack_ts) if incident.slack_ts else None
    posted = _send(notifier, "slack_incident", at, f"incident #{incident_id}", context)
    if posted is None:
        return False
    _store(engine, Incident, incident_id, posted)
    return True


def incident_report(engine: Engine, incident_id: int, language: str) -> str:
    """The incident with its whole timeline, in markdown: its Prefect artifact."""
    with session_scope(engine) as session:
        incident = incidents.get(session, incident_id)
        context = incident_context(session, incident, language)
    return render("prefect_incident_report", language, **context)


def incident_context(session, incident: Incident, language: str, limit: int | None = None) -> dict:
    events = incidents.timeline(session, incident.id or 0)
    shown = events[-limit:] if limit else events
    return dict(
        incident=incident,
        cause=cause_text(incident.cause, language),
        opened=f"{as_utc(incident.opened_at):%Y-%m-%d %H:%M} UTC",
        updated=f"{as_utc(incident.updated_at):%Y-%m-%d %H:%M} UTC",
        timeline=[
            dict(
                at=f"{as_utc(e.at):%Y-%m-%d %H:%M}",
                kind=e.kind,
                actor=e.actor,
                summary=e.summary,
                audit_entry_id=e.audit_entry_id,
            )
            for e in shown
        ],
        hidden=len(events) - len(shown),
    )


def _send(notifier, template: str, at: Posted | None, what: str, context: dict) -> Posted | None:
    try:
        return notifier.message(template, at=at, **context)
    except NotifierUnavailable as exc:
        log.warning("Slack message of %s not %s: %s", what, "updated" if at else "posted", exc)
        return None


def _store(engine: Engine, table, row_id: int, posted: Posted) -> None:
    with session_scope(engine) as session:
        session.exec(
            update(table)
            .where(col(table.id) == row_id)
            .values(slack_channel=posted.channel, slack_ts=posted.ts)
        )
        session.commit()
