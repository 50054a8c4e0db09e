"""Runbook "blocklist scan" (runbooks/blocklist-scan.yaml, deployment blocklist-scan/scheduled,
every 15 minutes, or on demand).

Every sending IP and domain against every list of runbooks/blocklists.yaml, concurrently with
timeouts (protocol/blocklists.py). A listing of an IP is protected at once and for a bounded
time (protocol/delisting.py: suspended at the providers that consult that list; renewed by
every scan that still sees it) and a blocklist-delisting procedure is started for a new one.
An error answer or a timeout changes nothing: the list's state stands and a configuration
incident says which list answered what (folded while it lasts).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from sqlmodel import select

from flows import resources
from flows.blocklist_delisting import ON_DEMAND
from models import Procedure, ProcedureState
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications.announce import publish_incident
from notifications.slack import SlackNotifier
from protocol import blocklists, delisting, incidents
from runbooks.loader import blocklist_scan as rules
from runbooks.loader import blocklists as lists


@flow(name="blocklist-scan", log_prints=False)
def blocklist_scan_flow() -> dict:
    """Check every sending IP and domain against the DNS blocklists; protect new listings."""
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    runbook = rules()
    spec = runbook.spec
    declared = lists().spec
    with session_scope(engine) as session:  # one query: what to scan
        wanted = blocklists.targets(session)
    answers = blocklists.scan(  # no transaction open while DNS answers
        wanted,
        blocklists.nameservers_of(settings),
        lists=declared.lists,
        dqs_key=settings.spamhaus_dqs_key,
        timeout=spec.timeout_seconds,
        concurrency=spec.concurrency,
    )
    if not answers:
        logger.info("nothing to scan and the lists answer; nothing to do")
        return {"targets": 0}
    run = FlowRunContext.get()
    actor = f"flow:{run.flow_run.id}" if run and run.flow_run else "flow:blocklist-scan"
    now = clock_for(settings.environment, engine).now()
    audit = (runbook.id, runbook.version)
    touched: set[int] = set()
    with session_scope(engine) as session:
        result = blocklists.apply(session, answers, now=now, actor=actor, runbook=audit)
        protected = []
        for answer in result.listed:  # new and standing listings of IPs: protect or renew
            if answer.kind != "ip":
                continue
            done = delisting.protect(
                session,
                answer.target,
                declared.by_id(answer.list_id),
                hours=spec.protect_hours,
                now=now,
                actor=actor,
                runbook=audit,
            )
            protected.append({"ip": answer.target, "list": answer.list_id, **done})
        for event in result.listings:
            if event.target_kind != "domain":
                continue
            # A listed domain's mail is refused wherever it leaves from: moving IPs protects
            # nothing, so no automatic step; a person looks (incident, Slack).
            reported = incidents.report(
                session,
                subject=f"domain:{event.target}",
                cause="blocklisted",
                severity="critical",
                summary=f"{event.target} listed on {event.list_name}: {event.meaning}",
                actor=actor,
                now=now,
                evidence={
                    "list": event.list_id,
                    "codes": list(event.codes),
                    "reason": event.reason,
                },
                runbook_id=runbook.id,
                runbook_version=runbook.version,
            )
            touched.add(reported.incident.id or 0)
        for answer in result.errors:
            reported = incidents.report(
                session,
                subject=f"blocklist:{answer.list_id}",
                cause=spec.error_cause,
                severity="warning",
                summary=f"{answer.list_name} gives no verdict on {answer.target}: {answer.error}",
                actor=actor,
                now=now,
                evidence={"query": answer.query, "codes": list(answer.codes)},
                runbook_id=runbook.id,
                runbook_version=runbook.version,
            )
            touched.add(reported.incident.id or 0)
        session.commit()
    started = []
    for event in result.listings:
        if event.target_kind != "ip" or _open(engine, f"ip:{event.target}/{event.list_id}"):
            continue
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            ON_DEMAND,
            parameters={"ip": event.target, "list_id": event.list_id},
            timeout=0,
            as_subflow=False,
        )
        started.append({"ip": event.target, "list": event.list_id, "run": str(flow_run.id)})
    notifier = SlackNotifier.from_settings(settings)
    for incident_id in sorted(touched):
        publish_incident(engine, notifier, incident_id)
    summary = {
        "targets": len(wanted),
        "answers": result.answers,
        "events": [e.as_json() for e in result.events],
        "errors": [a.as_json() for a in result.errors],
        "protected": protected,
        "delisting_started": started,
    }
    logger.info("%s", summary)
    return summary


def _open(engine, subject: str) -> bool:
    with session_scope(engine) as session:
        return (
            session.exec(
                select(Procedure.id).where(
                    Procedure.name == "blocklist-delisting",
                    Procedure.subject == subject,
                    Procedure.state.in_(ProcedureState.OPEN),
                )
            ).first()
            is not None
        )
