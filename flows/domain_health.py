"""Runbook "domain health" (runbooks/domain-health.yaml, deployment domain-health/scheduled):
every active domain's DNS re-checked daily, and the DMARC aggregate reports about our mail.

It opens incidents, with their Slack message and Prefect artifact, and tells the customer once
when their records break; it changes nothing the relay reads. The logic is in
protocol/domain_health.py.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows import resources
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications import customer_mail
from notifications.announce import incident_report, publish_incident
from notifications.slack import SlackNotifier
from protocol import domain_health
from runbooks.loader import domain_health as rules


@flow(name="domain-health", log_prints=False)
def domain_health_flow() -> dict:
    """Re-check every active domain's DNS and read the DMARC reports; incidents when broken."""
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    with session_scope(engine) as session:
        names = domain_health.active_domains(session)
    if not names:
        logger.info("no active domain; nothing to do")
        return {"checked": []}
    runbook = rules()
    run = FlowRunContext.get()
    actor = f"flow:{run.flow_run.id}" if run and run.flow_run else "flow:domain-health"
    now = clock_for(settings.environment, engine).now()
    result = domain_health.HealthResult()
    for name in names:  # one transaction per domain: a slow DNS answer holds no lock for long
        with session_scope(engine) as session:
            domain_health.check_dns(
                session, settings, name, result, now=now, actor=actor, runbook=runbook
            )
            session.commit()
    with session_scope(engine) as session:
        domain_health.check_dmarc_reports(session, result, now=now, actor=actor, runbook=runbook)
        session.commit()
    for notice in result.notices:  # marked due in the incident: never sent twice
        with session_scope(engine) as session:
            said = customer_mail.send_notice(
                session,
                settings,
                notice["tenant"],
                "email_domain_dns_broken",
                actor=actor,
                domain=notice["domain"],
                at=f"{now:%Y-%m-%d %H:%M} UTC",
                missing=notice["missing"],
            )
            session.commit()
        notice.update(sent=said["sent"], reason=said["reason"], queued_as=said["queued_as"])
    notifier = SlackNotifier.from_settings(settings)
    for incident_id in sorted(set(result.incidents + result.resolved)):
        publish_incident(engine, notifier, incident_id)
        create_markdown_artifact(
            key=f"incident-{incident_id}",
            markdown=incident_report(engine, incident_id, settings.slack_language),
            description=f"Incident #{incident_id} and its timeline",
        )
    logger.info("%s", result.as_json())
    return result.as_json()
