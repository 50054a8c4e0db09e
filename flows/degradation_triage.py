"""Runbook "degradation triage" (runbooks/degradation-triage.yaml).

Scheduled (degradation-triage/scheduled, every 5 minutes, action "detect"): every subject
that sent in the last day — (IP, provider), (From domain, provider), tenant stream — its
signals over the runbook's windows against the thresholds, its own 7-day baseline and its
declared volume (protocol/triage.py), each subject's windows starting again where its last
triage incident was resolved; one incident per subject and cause, folded while open, with the
evidence and the proposed action, posted to Slack (one message, updated in place) and
published as an artifact. Each new incident with a proposal gets one run of
degradation-triage/respond.

Respond (degradation-triage/respond, one incident each, a durable procedure): the cause's
ladder, rung by rung — lower_rate is applied at once (protective, ending by itself); every
other action asks triage.act with the evidence, a table and a chart, and is applied through
the operator verbs once approved; the customer gets a report in its language when the
action touches its mail (and customer_report is nothing else) → after the cause's interval
the subject is verified on the signals since the action → improved: resolved with a summary;
not improved: escalated and the next rung proposed; nothing left, rejected or expired: the
incident stays escalated for people. The logic is in protocol/triage_response.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, ProcedureRun, procedure
from models.audit import as_utc
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications import customer_mail
from notifications.announce import incident_report, publish_incident
from notifications.slack import SlackNotifier
from protocol import incidents, triage, triage_response
from protocol.errors import ServiceError
from protocol.verbs import Act, by_flow
from runbooks.loader import degradation_triage as rules

RESPOND = "degradation-triage/respond"


@flow(name="degradation-triage", log_prints=False)
def degradation_triage_flow(
    action: Literal["detect", "respond"] = "detect",
    incident_id: int | None = None,
    procedure_id: ProcedureId = None,
) -> dict:
    """Find degrading subjects and act on them, rung by rung, verifying each action.

    Args:
        action: detect: one cycle over every subject (the schedule's); respond: act on one
            incident the cycle opened (`incident_id`), through triage.act where it asks.
        incident_id: The incident to respond to (action respond).
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    if action == "detect":
        return _detect()
    if incident_id is None:
        raise ServiceError("action respond needs incident_id")
    return _respond(int(incident_id), procedure_id)


# ---------------------------------------------------------------- detect
def _detect() -> dict:
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
        since = {
            triage_response.subject_of(session, label): at
            for label, at in triage_response.windows_since(session, now).items()
            if _is_subject(label)
        }
        report = triage.detect(
            session,
            runbook.spec,
            now=now,
            actor=actor,
            runbook=(runbook.id, runbook.version),
            since=since,
        )
        session.commit()
        respond = triage_response.needing_response(session, report.incidents)
    notifier = SlackNotifier.from_settings(settings)
    for incident_id in sorted(set(report.incidents)):
        publish_incident(engine, notifier, incident_id)
        create_markdown_artifact(
            key=f"incident-{incident_id}",
            markdown=incident_report(engine, incident_id, settings.slack_language),
            description=f"Incident #{incident_id} and its timeline",
        )
    started = []
    for incident_id in respond:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            RESPOND,
            parameters={"action": "respond", "incident_id": incident_id},
            timeout=0,
            as_subflow=False,
        )
        started.append({"incident_id": incident_id, "run": str(flow_run.id)})
    summary = report.as_json() | {"respond_started": started}
    logger.info("%s", summary)
    return summary


def _is_subject(label: str) -> bool:
    return label.split(":", 1)[0] in ("path", "domain", "stream")


# ---------------------------------------------------------------- respond
def _respond(incident_id: int, procedure_id: int | None) -> dict:
    settings = resources.settings()
    engine = resources.engine_for(settings)
    runbook = rules()
    notifier = SlackNotifier.from_settings(settings)
    with procedure(
        runbook, subject=f"incident:{incident_id}", procedure_id=procedure_id, settings=settings
    ) as p:
        start = p.step("read", lambda s: triage_response.read(s, incident_id))
        rung = Rung(p, settings, engine, runbook, notifier, incident_id, start["subject"])
        cause = start["cause"]
        for number in range(1, triage_response.RUNG_LIMIT + 1):
            ended, cause = rung.climb(number, cause)
            if ended is not None:
                return _finish(p, ended, incident_id, rung.history, rung.note)
        note = f"the ladder ran {triage_response.RUNG_LIMIT} rungs without improvement"
        p.step("exhausted", lambda s: _escalate(s, incident_id, note, p))
        return _finish(p, "escalated", incident_id, rung.history, note)


class Rung:
    """One incident's ladder, climbed one rung at a time: propose → (ask) → apply → tell the
    customer → wait the cause's interval → verify → resolve, or escalate to the next rung.
    Every step is a procedure step numbered by its rung: a run started again replays them."""

    def __init__(self, p, settings, engine, runbook, notifier, incident_id: int, label: str):
        self.p, self.settings, self.engine = p, settings, engine
        self.runbook, self.spec, self.notifier = runbook, runbook.spec, notifier
        self.incident_id, self.label = incident_id, label
        self.tried: list[str] = []
        self.history: list[dict] = []
        self.note = ""

    def _escalate(self, key: str, note: str) -> None:
        self.note = note
        self.p.step(key, lambda s: _escalate(s, self.incident_id, note, self.p))
        publish_incident(self.engine, self.notifier, self.incident_id)

    def climb(self, n: int, cause: dict) -> tuple[str | None, dict]:
        """Rung n: (how the procedure ended, or None to go on; the cause as it stands)."""
        p, incident_id, label = self.p, self.incident_id, self.label
        proposed = p.step(
            f"propose#{n}",
            lambda s: triage_response.propose_next(s, label, cause, self.tried, self.spec),
        )["action"]
        if proposed is None:
            tried = ", ".join(self.tried) or "no action fits this subject and severity"
            self._escalate(
                f"exhausted#{n}", f"nothing left on its ladder ({tried}); a person decides"
            )
            return "escalated", cause
        name = proposed["action"]
        if proposed["approval"] == "required":
            decision = _ask(p, self.settings, self.runbook, label, cause, proposed, n)
            p.step(f"decided#{n}", lambda s: _decided(s, incident_id, decision, name, p))
            if not decision.approved:
                by = f" by {decision.decided_by}" if decision.decided_by else ""
                self._escalate(f"refused#{n}", f"{name} {decision.outcome}{by}")
                return decision.outcome, cause
            who = by_flow(
                p.flow_run_id,
                f"degradation triage, incident #{incident_id}",
                p.now(),
                decision.approval_id,
                decision.decided_by or "",
            )
        else:  # lower_rate: machines protect, within the runbook's bounds
            who = Act(
                actor=p.actor,
                reason=f"degradation triage, incident #{incident_id} (automatic)",
                now=p.now(),
                evidence={"incident_id": incident_id, "automatic": True},
            )
        audit = (self.runbook.id, self.runbook.version)
        try:
            applied = p.step(
                f"act#{n}", lambda s: triage_response.apply(s, incident_id, proposed, who, audit)
            )
        except ServiceError as exc:  # e.g. a stream already moved has no overflow pool left
            self._escalate(f"unapplied#{n}", f"{name} could not be applied: {exc}")
            return "escalated", cause
        self.tried.append(name)
        get_run_logger().info("incident #%s: %s applied: %s", incident_id, name, applied["done"])
        if name == "customer_report" or name in triage_response.TOUCHES_MAIL:
            notice = p.step(
                f"notify#{n}",
                lambda s: _notify(s, self.settings, incident_id, cause, name, applied, p),
            )
            get_run_logger().info("%s", notice.get("said", notice))
        publish_incident(self.engine, self.notifier, incident_id)
        applied_at = as_utc(datetime.fromisoformat(applied["applied_at"]))
        wait = timedelta(seconds=self.spec.causes[cause["cause"]].verify_after_seconds)
        p.sleep_until(
            f"verify-wait#{n}", applied_at + wait, waiting_for=f"verifying {name} on {label}"
        )
        checked = p.step(
            f"verify#{n}",
            lambda s: triage_response.check(
                s, incident_id, cause, self.spec, since=applied_at, now=p.now()
            ),
        )
        self.history.append({"rung": n, "action": name, "verdict": checked["verdict"]})
        if checked["verdict"] == "improved":
            self.note = _improved(name, applied, checked)
            p.step(
                f"resolve#{n}",
                lambda s: triage_response.resolve(
                    s, incident_id, self.note, actor=p.actor, now=p.now()
                ),
            )
            publish_incident(self.engine, self.notifier, incident_id)
            _publish_report(self.engine, self.settings, incident_id)
            return "resolved", cause
        shown = "; ".join(
            f"{f['signal']} {f['rate'] * 100:.2f} % over {f['window']} ({f['level']})"
            for f in checked["findings"][:3]
        )
        self._escalate(f"escalate#{n}", f"{name} did not help: {shown}")
        return None, checked["cause"] or cause


def _ask(p: ProcedureRun, settings, runbook, label: str, cause: dict, proposed: dict, rung: int):
    """triage.act with the evidence: the findings, a chart of the clues per window."""
    shown = p.step(
        f"evidence#{rung}",
        lambda s: triage_response.evidence(s, label, cause, runbook.spec, p.now()),
    )
    action = runbook.spec.actions[proposed["action"]]
    return request_approval(
        kind=runbook.spec.checkpoint,
        subject=label,
        proposal={
            "action": f"{proposed['action'].replace('_', ' ')} on {label}: {action.description}",
            "cause": f"{cause['cause']} ({cause['severity']})",
            "tried": f"rung {proposed['rung'] + 1} of its ladder",
        },
        evidence={**shown["findings"], "chart": f"```\n{shown['chart']}\n```"},
        settings=settings,
        runbook=runbook,
        procedure=p,
        ask=f"rung-{rung}",
    )


def _decided(session, incident_id: int, decision, name: str, p: ProcedureRun) -> dict:
    summary = f"triage.act {decision.outcome} for {name}" + (
        f" by {decision.decided_by}" if decision.decided_by else ""
    )
    incidents.add_event(
        session,
        incident_id,
        "approval",
        actor=p.actor,
        summary=summary + (f": {decision.comment}" if decision.comment else ""),
        now=p.now(),
        approval_id=decision.approval_id,
    )
    return {"outcome": decision.outcome, "approval_id": decision.approval_id}


def _escalate(session, incident_id: int, note: str, p: ProcedureRun) -> dict:
    return triage_response.escalate(session, incident_id, note, actor=p.actor, now=p.now())


def _notify(session, settings, incident_id, cause, name, applied, p: ProcedureRun) -> dict:
    tenant, variables = triage_response.customer_report(
        session,
        incident_id,
        cause,
        action=None if name == "customer_report" else name,
        done=applied["done"],
        now=p.now(),
    )
    if tenant is None:
        return {"sent": False, "reason": "no_customer", "said": "a shared path: no customer"}
    return customer_mail.send_notice(
        session, settings, tenant, "email_triage_report", actor=p.actor, **variables
    )


def _improved(name: str, applied: dict, checked: dict) -> str:
    sent = checked.get("sent_since")
    after = f"{sent} attempts since" if sent is not None else "no mail since"
    if name == "pause_stream":
        undo = f"; release with: {applied['done'].get('release_with', 'axiom stream release')}"
    elif name == "move_stream":
        undo = f"; back with: {applied['done'].get('back_with', 'axiom stream set')}"
    elif name == "pause_tenant":
        undo = "; resume with: axiom tenant resume"
    else:
        undo = ""
    return f"improved after {name.replace('_', ' ')} ({after}, no clue at warn or above){undo}"


def _publish_report(engine, settings, incident_id: int) -> None:
    create_markdown_artifact(
        key=f"incident-{incident_id}",
        markdown=incident_report(engine, incident_id, settings.slack_language),
        description=f"Incident #{incident_id} and its timeline",
    )


def _finish(p: ProcedureRun, outcome: str, incident_id: int, history: list, note: str) -> dict:
    result = {"outcome": outcome, "incident_id": incident_id, "rungs": history, "note": note}
    p.finish(result)
    return result
