"""Runbook "blocklist delisting" (runbooks/blocklist-delisting.yaml).

One (IP, list), started by blocklist-scan for a new listing or by an operator: protect (the
scan did it already; done again, it only renews) → an incident with the evidence → checkpoint
blocklist.fixed (the cause, in the approver's comment) → the request for that list, or "wait,
it expires by itself" → checkpoint blocklist.requested → watch until the listing clears, or
escalate at the deadline → the suspensions lifted, the IP re-warmed on the warm-up runbook's
re-warm plan, the incident resolved with its timeline.
The logic is in protocol/delisting.py; the scan and the listings' state in
protocol/blocklists.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, ProcedureRun, procedure
from notifications.announce import publish_incident
from notifications.slack import SlackNotifier
from notifications.templates import render
from protocol import delisting, incidents, warmup
from protocol.errors import ServiceError
from runbooks.loader import blocklist_delisting as rules
from runbooks.loader import blocklist_scan, blocklists, ip_warmup

ON_DEMAND = "blocklist-delisting/on-demand"


@flow(name="blocklist-delisting", log_prints=False)
def blocklist_delisting_flow(ip: str, list_id: str, procedure_id: ProcedureId = None) -> dict:
    """Get IP off the list LIST_ID: cause fixed first, then the request, then the wait.

    Args:
        ip: The listed sending IP.
        list_id: The list, as runbooks/blocklists.yaml names it (spamhaus-zen, barracuda,
            spamcop, uceprotect-1, psbl, mailspike-z).
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    runbook = rules()
    spec = runbook.spec
    try:
        blocklist = blocklists().spec.by_id(list_id)
    except KeyError:
        known = ", ".join(b.id for b in blocklists().spec.lists)
        raise ServiceError(
            f"list {list_id!r} is not in runbooks/blocklists.yaml ({known})"
        ) from None
    audit = (runbook.id, runbook.version)
    notifier = SlackNotifier.from_settings(settings)
    with procedure(runbook, subject=f"ip:{ip}/{list_id}", procedure_id=procedure_id) as p:
        listed = p.step("listing", lambda s: delisting.listing(s, ip, list_id) or {})
        protected = p.step(
            "protect",
            lambda s: delisting.protect(
                s,
                ip,
                blocklist,
                hours=blocklist_scan().spec.protect_hours,
                now=p.now(),
                actor=p.actor,
                runbook=audit,
            ),
        )
        opened = p.step(
            "incident",
            lambda s: delisting.open_incident(
                s,
                ip,
                blocklist,
                listed,
                cause=spec.incident_cause,
                hours=spec.evidence_hours,
                now=p.now(),
                actor=p.actor,
                runbook=audit,
            ),
        )
        incident_id = opened["incident_id"]
        publish_incident(engine, notifier, incident_id)
        providers = blocklist.consulted_by
        rows = opened["traffic"]
        fixed = request_approval(
            kind=spec.fixed_checkpoint,
            subject=f"ip:{ip}",
            proposal={
                "action": f"confirm the cause of {ip}'s listing on {blocklist.name} is found and "
                "fixed; write what it was and what was done in the comment",
                "meanwhile": f"{ip} sends nothing to {', '.join(providers) or 'no provider'}",
            },
            evidence={
                "listing": f"{', '.join(listed.get('codes') or []) or '?'}: "
                f"{listed.get('meaning') or '?'}",
                "reason": listed.get("reason") or "none given",
                f"last {spec.evidence_hours} h": "; ".join(
                    f"{r['tenant']}/{r['stream']}: {r['sent']} sent, {r['complaints']} "
                    f"complaints, {r['bounced'] + r['refused']} bounced"
                    for r in rows[:5]
                )
                or "no mail",
                "incident": f"#{incident_id}",
            },
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        if not fixed.approved:
            return _finish(p, engine, notifier, incident_id, "not_fixed", fixed)
        cause = (fixed.comment or "").strip() or "not described by the approver"
        request = p.step(
            "request",
            lambda s: {
                "markdown": render(
                    "prefect_delisting_request",
                    settings.slack_language,
                    ip=ip,
                    list_name=blocklist.name,
                    zone=blocklist.zone,
                    code=", ".join(listed.get("codes") or []) or "?",
                    meaning=listed.get("meaning") or "?",
                    reason=listed.get("reason") or "",
                    listed_since=listed.get("first_seen") or "?",
                    expires_hours=blocklist.removal.expires_hours,
                    removal_url=blocklist.removal.url,
                    procedure=blocklist.removal.procedure.strip(),
                    fixed=cause,
                    facts=delisting.facts(listed, rows, cause, providers),
                )
            },
        )
        create_markdown_artifact(
            key=f"delisting-{ip.replace('.', '-').replace(':', '-')}-{list_id}",
            markdown=request["markdown"],
            description=f"Delisting request: {ip} on {blocklist.name}",
        )
        expires = blocklist.removal.expires_hours
        requested = request_approval(
            kind=spec.requested_checkpoint,
            subject=f"ip:{ip}",
            proposal={
                "action": (
                    f"wait: {blocklist.name} listings expire {expires} h after the last report "
                    "(do not ask for removal); approve to watch"
                )
                if expires
                else f"submit the removal request at {blocklist.removal.url}, then approve",
            },
            evidence={
                "where": blocklist.removal.url,
                "how": blocklist.removal.procedure.strip(),
                "cause and fix": cause,
                "request": f"Prefect artifact delisting-{ip}-{list_id}",
            },
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        if not requested.approved:
            return _finish(p, engine, notifier, incident_id, "not_requested", requested)
        deadline = p.step(
            "deadline",
            lambda s: {"at": (p.now() + timedelta(days=spec.deadline_days)).isoformat()},
        )
        watched = p.poll(
            "watch",
            lambda s: _cleared(s, ip, list_id, p),
            until=_aware(deadline["at"]),
            every=timedelta(seconds=spec.watch_seconds),
            waiting_for=f"{blocklist.name} to clear {ip}",
        )
        if not watched["passed"]:
            p.step(
                "escalate",
                lambda s: (
                    incidents.report(
                        s,
                        subject=f"ip:{ip}",
                        cause=spec.incident_cause,
                        severity="critical",
                        summary=f"{ip} still listed on {blocklist.name} after "
                        f"{spec.deadline_days} days: escalate",
                        actor=p.actor,
                        now=p.now(),
                        runbook_id=runbook.id,
                        runbook_version=runbook.version,
                    ).incident.id
                ),
            )
            publish_incident(engine, notifier, incident_id)
            logger.warning("%s still listed on %s at the deadline", ip, blocklist.name)
            return _finish(p, engine, notifier, incident_id, "deadline", requested)
        lifted = p.step(
            "unprotect",
            lambda s: delisting.lift(s, ip, list_id, now=p.now(), actor=p.actor, runbook=audit),
        )
        rewarm = p.step("rewarm", lambda s: _rewarm(s, ip, p))
        p.step(
            "resolve",
            lambda s: (
                incidents.transition(
                    s,
                    incident_id,
                    "resolved",
                    actor=p.actor,
                    note=f"{blocklist.name} cleared {ip}; suspensions lifted "
                    f"({', '.join(lifted) or 'none left'}); re-warm on plan {rewarm['plan']}",
                    now=p.now(),
                ).id
            ),
        )
        publish_incident(engine, notifier, incident_id)
        outcome = {
            "outcome": "delisted",
            "ip": ip,
            "list": list_id,
            "incident_id": incident_id,
            "protected": protected["started"],
            "cause": cause,
            "rewarm": rewarm,
        }
        p.finish(outcome)
        return outcome


def _cleared(session, ip: str, list_id: str, p: ProcedureRun) -> dict:
    state = delisting.listing(session, ip, list_id) or {}
    return {"passed": state.get("state") == "clear", "state": state, "at": p.now().isoformat()}


def _rewarm(session, ip: str, p: ProcedureRun) -> dict:
    """Back on the warm-up runbook's re-warm plan: the people who fixed the cause and asked
    for removal have decided already; the plan's caps protect the IP's first days back."""
    runbook = ip_warmup()
    plan = runbook.spec.rewarm_plan
    existing = warmup.running_plan(session, ip_id=warmup.get_ip(session, ip).id)
    if existing is not None:
        return {"plan": existing.schedule_id, "plan_id": existing.id, "already": True}
    started = warmup.start(
        session, ip, plan, runbook, reason="delisted", candidates="all", actor=p.actor, now=p.now()
    )
    return {"plan": plan, "plan_id": started["plan_id"], "already": started["already"]}


def _finish(p, engine, notifier, incident_id, outcome, decision) -> dict:
    result = {
        "outcome": outcome,
        "incident_id": incident_id,
        "approval_id": decision.approval_id,
        "decision": decision.outcome,
        "decided_by": decision.decided_by,
    }
    p.finish(result)
    publish_incident(engine, notifier, incident_id)
    return result


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
