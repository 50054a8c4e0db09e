"""Runbook "IP warm-up" (runbooks/ip-warmup.yaml).

Scheduled (ip-warmup/scheduled, daily just after midnight UTC, action "evaluate"): judge every
warming IP and domain per provider on the day that ended, write the new day's caps, make idle
IPs cold, publish the status as an artifact with a chart, and start a run of
ip-warmup/on-demand for each decision that needs a person. A warm-up lasts weeks; no run
lives that long: where each plan stands is state in the database.

On demand (ip-warmup/on-demand), one subject each, through a checkpoint:
- start:    warm an IP on a named plan (evidence: its FCrDNS, pool, streams, the plan) →
            warmup.start → the plan runs, caps from today;
- review:   a plan the signals stopped → warmup.review → step back, pause or continue
            (written in the approver's comment; step back when empty);
- complete: declare an IP warm (its plan's last stage went well, or an operator knows it is
            warm) → warmup.complete → active, no caps.
The logic is in protocol/warmup.py; the relay enforces the caps (relay/delivery/egress.py).
"""

from __future__ import annotations

import re
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field
from sqlmodel import select

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, ProcedureRun, procedure
from models import Procedure, ProcedureState, WarmupPlan
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications.templates import render
from protocol import dns_checks, warmup
from protocol.errors import ServiceError
from runbooks.loader import ip_warmup as rules

ON_DEMAND = "ip-warmup/on-demand"
Action = Literal["evaluate", "start", "review", "complete"]
Reason = Literal["new", "idle", "delisted"]


class WarmupOutcome(BaseModel):
    action: Action
    outcome: str
    subject: str | None = None
    plan: str | None = None
    approval_id: int | None = None
    decision: str | None = None
    decided_by: str | None = None
    result: dict = Field(default_factory=dict)
    started: list[dict] = Field(default_factory=list)


@flow(name="ip-warmup", log_prints=False)
def ip_warmup_flow(
    action: Action = "evaluate",
    ip: str | None = None,
    plan: str | None = None,
    reason: Reason = "new",
    candidates: Literal["all", "marked"] = "all",
    plan_id: int | None = None,
    procedure_id: ProcedureId = None,
) -> WarmupOutcome:
    """Warm up sending IPs on a plan; judge each day; ask a person where it matters.

    Args:
        action: evaluate: the daily judgement of every warming IP and domain (the schedule's);
            start: warm `ip` on a plan; review: decide on a plan the signals stopped
            (`plan_id`); complete: declare `ip` warm, with or without a plan.
        ip: The IP address to start or complete.
        plan: A plan of runbooks/ip-warmup.yaml (standard, sendgrid, ses-45, rewarm, domain,
            sandbox); empty: the pool's plan, or rewarm for an idle or delisted IP.
        reason: Why it warms: new, idle (no mail for 30 days) or delisted (back from a
            blocklist).
        candidates: all: every message may use the warming IP, marked ones first; marked:
            only messages with the X-Axiom-Warmup header (engaged recipients) use it.
        plan_id: The plan to review or complete (as `axiom warmup status` shows it).
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    if action == "evaluate":
        return _evaluate()
    if action == "start":
        return _start(_need(ip, "ip", action), plan, reason, candidates, procedure_id)
    if action == "review":
        return _review(int(_need(plan_id, "plan_id", action)), procedure_id)
    return _complete(ip, plan_id, procedure_id)


def _need(value, name: str, action: str):
    if value is None or value == "":
        raise ServiceError(f"action {action} needs {name}")
    return value


# ---------------------------------------------------------------- daily
def _evaluate() -> WarmupOutcome:
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    runbook = rules()
    now = clock_for(settings.environment, engine).now()
    with session_scope(engine) as session:  # the cheap check first: one select
        plans = warmup.plans_in(session)
        idle = warmup.idle_ips(session, now, runbook.spec.rewarm_after_idle_days)
    if not plans and not idle:
        logger.info("no IP or domain is warming and none is idle; nothing to do")
        return WarmupOutcome(action="evaluate", outcome="nothing_to_do")
    run = FlowRunContext.get()
    actor = f"flow:{run.flow_run.id}" if run and run.flow_run else "flow:ip-warmup"
    with session_scope(engine) as session:
        report = warmup.daily(session, runbook, now=now, actor=actor)
        session.commit()
    started = []
    for follow in report.follow_ups:
        if _open(engine, _procedure_subject(follow.action, follow.subject)):
            continue  # its checkpoint is already asked
        from prefect.deployments import run_deployment

        run_deployment(ON_DEMAND, parameters=follow.parameters(), timeout=0, as_subflow=False)
        started.append(follow.parameters())
    _publish_status(engine, settings, runbook, now)
    logger.info("warm-up judged: %s", report.as_json())
    return WarmupOutcome(
        action="evaluate", outcome="judged", result=report.as_json(), started=started
    )


def _procedure_subject(action: str, subject: str) -> str:
    return f"{subject}/warmup-{action}"


def open_procedure(subject: str, action: str) -> bool:
    """An ip-warmup procedure for this subject and action is running or waiting."""
    return _open(resources.engine_for(resources.settings()), _procedure_subject(action, subject))


def _open(engine, subject: str) -> bool:
    with session_scope(engine) as session:
        return (
            session.exec(
                select(Procedure.id).where(
                    Procedure.name == "ip-warmup",
                    Procedure.subject == subject,
                    Procedure.state.in_(ProcedureState.OPEN),
                )
            ).first()
            is not None
        )


def _publish_status(engine, settings, runbook, now) -> None:
    with session_scope(engine) as session:
        rows = warmup.status(session, runbook, now=now)
        charts = []
        for plan_id in sorted({r.plan_id for r in rows}):
            subject = next(r.subject for r in rows if r.plan_id == plan_id)
            for provider, days in sorted(warmup.history(session, plan_id).items()):
                if any(sent for _, _, sent in days):
                    charts.append(
                        {"subject": f"{subject} {provider}", "text": warmup.chart(days[-21:])}
                    )
    create_markdown_artifact(
        key="ip-warmup-status",
        markdown=render(
            "prefect_warmup_status",
            settings.slack_language,
            day=f"{now:%Y-%m-%d}",
            rows=[r for r in rows if r.sent or r.provider == "*" or r.signals],
            subjects=len({r.subject for r in rows}),
            charts=charts,
        ),
        description="Warming IPs and domains: stage, cap, sent, signals, next decision",
    )


# ---------------------------------------------------------------- start
def _start(address, plan_name, reason, candidates, procedure_id) -> WarmupOutcome:
    settings = resources.settings()
    runbook = rules()
    spec = runbook.spec
    with procedure(
        runbook,
        subject=_procedure_subject("start", f"ip:{address}"),
        procedure_id=procedure_id,
    ) as p:
        evidence = p.step(
            "evidence", lambda s: _start_evidence(s, settings, address, plan_name, reason)
        )
        chosen = evidence["plan"]
        decision = request_approval(
            kind=spec.start_checkpoint,
            subject=f"ip:{address}",
            proposal={
                "action": f"warm {address} on plan {chosen} ({evidence['sending_days']} "
                f"sending days, {evidence['stages'][0]} to {evidence['stages'][-1]} a day "
                "per provider)",
                "overflow": "above the caps mail goes to the stream's fallback pool"
                if evidence["overflow"] == "fallback"
                else "above the caps mail waits",
                "candidates": candidates,
            },
            evidence={
                "FCrDNS": evidence["fcrdns"],
                "pool": evidence["pool"],
                "streams": ", ".join(evidence["streams"]) or "none yet",
                "first day's caps": ", ".join(
                    f"{k} {v}" for k, v in evidence["first_day_caps"].items()
                ),
                "reason": reason,
            },
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        base = {
            "action": "start",
            "subject": f"ip:{address}",
            "plan": chosen,
            "approval_id": decision.approval_id,
            "decision": decision.outcome,
            "decided_by": decision.decided_by,
        }
        if not decision.approved:
            return _finish(p, WarmupOutcome(outcome="not_started", **base))
        started = p.step(
            "start",
            lambda s: warmup.start(
                s,
                address,
                chosen,
                runbook,
                reason=reason,
                candidates=candidates,
                actor=p.actor,
                now=p.now(),
                approval_id=decision.approval_id,
                approved_by=decision.decided_by or "",
            ),
        )
        return _finish(p, WarmupOutcome(outcome="started", result=started, **base))


def _start_evidence(session, settings, address, plan_name, reason) -> dict:
    runbook = rules()
    ip = warmup.get_ip(session, address)
    chosen = plan_name or warmup.choose_plan(session, ip, runbook, reason)
    evidence = warmup.start_evidence(session, address, chosen, runbook)
    check = dns_checks.check_ip(ip.address, ip.ptr_name, settings)
    evidence["fcrdns"] = f"{'ok' if check.ok else 'FAIL'}: {check.reason}"
    return evidence


# ---------------------------------------------------------------- review
def review_choice(comment: str | None) -> warmup.ReviewChoice:
    """What the approver wrote: pause, continue, or step back (also when empty)."""
    words = re.findall(r"[a-z_-]+", (comment or "").lower())
    for word in words:
        if word in ("pause", "paused"):
            return "pause"
        if word in ("continue", "resume", "go"):
            return "continue"
    return "step_back"


def _review(plan_id: int, procedure_id) -> WarmupOutcome:
    settings = resources.settings()
    runbook = rules()
    spec = runbook.spec
    engine = resources.engine_for(settings)
    with session_scope(engine) as session:
        row = session.get(WarmupPlan, plan_id)
        if row is None:
            raise ServiceError(f"no warm-up plan {plan_id}")
        subject = warmup.subject_of(session, row).label
    with procedure(
        runbook, subject=_procedure_subject("review", subject), procedure_id=procedure_id
    ) as p:
        evidence = p.step("evidence", lambda s: _review_evidence(s, runbook, plan_id, p))
        decision = request_approval(
            kind=spec.review_checkpoint,
            subject=subject,
            proposal={
                "action": f"step {subject}'s warm-up back {spec.judgement.step_back_stages} "
                "stages (write 'pause' or 'continue' in the comment instead)",
                "until then": "the caps stay where they are and do not rise",
            },
            evidence=evidence,
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        choice: warmup.ReviewChoice = (
            review_choice(decision.comment) if decision.approved else "pause"
        )
        result = p.step(
            "apply",
            lambda s: warmup.review(
                s,
                plan_id,
                choice,
                runbook,
                actor=p.actor,
                now=p.now(),
                approval_id=decision.approval_id,
                approved_by=decision.decided_by or "",
            ),
        )
        return _finish(
            p,
            WarmupOutcome(
                action="review",
                outcome=choice,
                subject=subject,
                approval_id=decision.approval_id,
                decision=decision.outcome,
                decided_by=decision.decided_by,
                result=result,
            ),
        )


def _review_evidence(session, runbook, plan_id: int, p: ProcedureRun) -> dict:
    row = session.get(WarmupPlan, plan_id)
    days = warmup.history(session, plan_id)
    last = {}
    for provider, series in days.items():
        day, cap, sent = series[-1]
        last[provider] = f"{sent}/{cap} on {day:%Y-%m-%d}"
    from models import AuditEntry

    latest = session.exec(
        select(AuditEntry)
        .where(AuditEntry.subject == warmup.subject_of(session, row).label)
        .where(AuditEntry.action.in_(["warmup.review", "warmup.advance", "warmup.hold"]))
        .order_by(AuditEntry.id.desc())
    ).first()
    reasons = (latest.evidence or {}).get("reasons", []) if latest else []
    return {
        "plan": f"{row.schedule_id} (#{plan_id}), state {row.state}",
        "why": "; ".join(reasons) or "asked by an operator",
        "stages": ", ".join(f"{k} {v}" for k, v in sorted((row.stages or {}).items())),
        "last day (sent/cap)": ", ".join(f"{k} {v}" for k, v in sorted(last.items())) or "none",
    }


# ---------------------------------------------------------------- complete
def _complete(address: str | None, plan_id: int | None, procedure_id) -> WarmupOutcome:
    settings = resources.settings()
    runbook = rules()
    engine = resources.engine_for(settings)
    if address is None:
        with session_scope(engine) as session:
            row = session.get(WarmupPlan, int(_need(plan_id, "ip or plan_id", "complete")))
            if row is None or row.ip_id is None:
                raise ServiceError(f"warm-up plan {plan_id} is not an IP's")
            address = warmup.subject_of(session, row).name
    with procedure(
        runbook, subject=_procedure_subject("complete", f"ip:{address}"), procedure_id=procedure_id
    ) as p:
        evidence = p.step("evidence", lambda s: _complete_evidence(s, runbook, address))
        decision = request_approval(
            kind=runbook.spec.complete_checkpoint,
            subject=f"ip:{address}",
            proposal={"action": f"declare {address} warm: it carries full traffic, no caps"},
            evidence=evidence,
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        base = {
            "action": "complete",
            "subject": f"ip:{address}",
            "approval_id": decision.approval_id,
            "decision": decision.outcome,
            "decided_by": decision.decided_by,
        }
        if not decision.approved:
            return _finish(p, WarmupOutcome(outcome="not_completed", **base))
        result = p.step(
            "complete",
            lambda s: warmup.declare_warm(
                s,
                address,
                runbook,
                actor=p.actor,
                now=p.now(),
                approved_by=decision.decided_by or "",
                approval_id=decision.approval_id,
            ),
        )
        return _finish(p, WarmupOutcome(outcome="completed", result=result, **base))


def _complete_evidence(session, runbook, address: str) -> dict:
    ip = warmup.get_ip(session, address)
    plan = warmup.running_plan(session, ip_id=ip.id)
    if plan is None:
        return {"ip": address, "state": str(ip.state), "plan": "none: declared warm by hand"}
    days = warmup.history(session, plan.id or 0)
    sent = sum(s for series in days.values() for _, _, s in series)
    return {
        "ip": address,
        "plan": f"{plan.schedule_id} (#{plan.id}) since {plan.started_on}",
        "stages": ", ".join(f"{k} {v}" for k, v in sorted((plan.stages or {}).items())),
        "sent under the plan": str(sent),
    }


def _finish(p: ProcedureRun, outcome: WarmupOutcome) -> WarmupOutcome:
    p.finish(outcome.model_dump(mode="json"))
    return outcome
