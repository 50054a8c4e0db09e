"""Runbook reactions-watch: announce the relay's protective reactions; incidents when they recur.

Scheduled every minute (runbooks/reactions-watch.yaml). Read → record (protocol/announcements.py:
cursor, announcements and incidents in one transaction) → tell (Slack messages edited in
place, a markdown artifact per incident with its whole timeline). An idle run is one query.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows import resources
from models.sandbox_clock import clock_for
from notifications.announce import announce_reactions, incident_report, publish_incident
from notifications.slack import SlackNotifier
from protocol.announcements import read_reactions, record_reactions
from runbooks.loader import reactions_watch


@flow(name="reactions-watch", log_prints=False)
def reactions_watch_flow() -> dict:
    """Announce the relay's automatic suspensions and throttles in Slack, grouped per path and
    window; open or update an incident when they recur on a path."""
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    entries = read_reactions(engine)
    if not entries:
        logger.info("nothing to do")
        return {"read": 0}
    rules = reactions_watch()
    run = FlowRunContext.get()
    actor = f"flow:{run.flow_run.id}" if run and run.flow_run else "flow:reactions-watch"
    recorded = record_reactions(
        engine, entries, rules, actor=actor, now=clock_for(settings.environment, engine).now()
    )
    notifier = SlackNotifier.from_settings(settings)
    posted = announce_reactions(engine, notifier, recorded.announcements)
    for incident_id in recorded.incidents:
        publish_incident(engine, notifier, incident_id)
        create_markdown_artifact(
            key=f"incident-{incident_id}",
            markdown=incident_report(engine, incident_id, settings.slack_language),
            description=f"Incident #{incident_id} and its timeline",
        )
    logger.info("%s; %d Slack message(s) posted or updated", recorded.as_json(), posted)
    return recorded.as_json() | {"slack": posted}
