"""Runbook "degradation triage" (runbooks/degradation-triage.yaml, deployment
degradation-triage/scheduled, every 5 minutes).

Built so far (issue 17, open): steps 1 and 2 — every subject that sent in the last day, its
signals over the runbook's windows against the thresholds, its own 7-day baseline and its
declared volume (protocol/triage.py, pure and table-tested), and one incident per subject and
cause, folded while open, with the evidence and the action the cause's ladder proposes next,
posted to Slack (one message, updated in place) and published as a Prefect artifact. It
changes nothing the relay reads yet: asking `triage.act`, applying the action through the
operator verbs and verifying are the next steps of the issue.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows import resources
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications.announce import incident_report, publish_incident
from notifications.slack import SlackNotifier
from protocol import triage
from runbooks.loader import degradation_triage as rules


@flow(name="degradation-triage", log_prints=False)
def degradation_triage_flow() -> dict:
    """Find degrading subjects (paths, domains, streams) and open one incident per cause."""
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    runbook = rules()
    now = clock_for(settings.environment, engine).now()
    if not triage.subjects_with_mail(engine, now):
        logger.info("no mail in the last 24 h; nothing to do")
        return {"subjects": 0}
    run = FlowRunContext.get()
    actor = f"flow:{run.flow_run.id}" if run and run.flow_run else "flow:degradation-triage"
    with session_scope(engine) as session:
        report = triage.detect(
            session, runbook.spec, now=now, actor=actor, runbook=(runbook.id, runbook.version)
        )
        session.commit()
    notifier = SlackNotifier.from_settings(settings)
    for incident_id in sorted(set(report.incidents)):
        publish_incident(engine, notifier, incident_id)
        create_markdown_artifact(
            key=f"incident-{incident_id}",
            markdown=incident_report(engine, incident_id, settings.slack_language),
            description=f"Incident #{incident_id} and its timeline",
        )
    logger.info("%s", report.as_json())
    return report.as_json()
