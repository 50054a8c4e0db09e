"""Runbook "DKIM key rotation" (runbooks/dkim-rotation.yaml).

One domain (deployment dkim-rotation/on-demand, or started by the schedule): new keys → their
records to the customer → wait until DNS shows them → checkpoint domain.rotate → the new keys
sign (the relay picks them up within its key cache time, no restart) → the old keys stay
published for the overlap → retired, and the customer is told the old records can go.

Scheduled (dkim-rotation/scheduled, no domain): one query finds the active domains whose keys
have signed for rotate_after_days; it starts a run of the on-demand deployment for each.
The logic is in protocol/dkim_rotation.py; the DNS checks in protocol/dns_checks.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, ProcedureRun, procedure
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications import customer_mail
from protocol import dkim_rotation, dns_checks, domains
from relay.submission.keystore import KeyBox
from runbooks.loader import dkim_rotation as rules

ON_DEMAND = "dkim-rotation/on-demand"


class RotationOutcome(BaseModel):
    outcome: Literal["rotated", "not_rotated", "deadline", "started", "nothing_due"]
    domain: str | None = None
    new: list[str] = Field(default_factory=list)
    old: list[str] = Field(default_factory=list)
    approval_id: int | None = None
    decision: str | None = None
    decided_by: str | None = None
    retired: list[str] = Field(default_factory=list)
    started: list[str] = Field(default_factory=list)
    notice: dict | None = None


@flow(name="dkim-rotation", log_prints=False)
def dkim_rotation_flow(
    domain: str | None = None,
    procedure_id: ProcedureId = None,
) -> RotationOutcome:
    """Rotate a domain's DKIM keys with an overlap, or start it for every domain that is due.

    Args:
        domain: The domain to rotate; empty: every active domain whose keys are due.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    settings = resources.settings()
    if domain is None and procedure_id is None:
        return _start_due(settings)
    runbook = rules()
    spec = runbook.spec
    name = (domain or "").lower().rstrip(".")
    logger = get_run_logger()
    audit = (runbook.id, runbook.version)
    with procedure(runbook, subject=f"domain:{name}/dkim", procedure_id=procedure_id) as p:
        keybox = KeyBox(settings.load_secret_key())
        keys = p.step(
            "keys",
            lambda s: dkim_rotation.begin(
                s, keybox, name, now=p.now(), actor=p.actor, runbook=audit
            ),
        )
        new, old = keys["new"], keys["old"]
        base = {"domain": name, "new": new, "old": old}
        deadline = p.step(
            "deadline", lambda s: {"at": (p.now() + timedelta(days=spec.deadline_days)).isoformat()}
        )
        until = _aware(deadline["at"])
        p.step("records", lambda s: _send_records(s, settings, p, name, new, until))
        check = p.poll(
            "check",
            lambda s: _check(s, settings, name, new, p),
            until=until,
            every=timedelta(seconds=spec.recheck_seconds),
            waiting_for=f"DNS of {name}'s new keys",
        )
        if not check["passed"]:
            p.step(
                "withdraw",
                lambda s: dkim_rotation.withdraw(
                    s, name, new, now=p.now(), actor=p.actor, why="deadline", runbook=audit
                ),
            )
            return _finish(p, RotationOutcome(outcome="deadline", **base))
        decision = request_approval(
            kind=spec.checkpoint,
            subject=f"domain:{name}",
            proposal={
                "action": f"sign {name}'s mail with {', '.join(new)}",
                "retire": f"{', '.join(old) or 'none'} after {spec.overlap_days} days",
            },
            evidence={c["name"]: c["reason"] for c in check["checks"]},
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        outcome = {
            **base,
            "approval_id": decision.approval_id,
            "decision": decision.outcome,
            "decided_by": decision.decided_by,
        }
        if not decision.approved:
            p.step(
                "withdraw",
                lambda s: dkim_rotation.withdraw(
                    s, name, new, now=p.now(), actor=p.actor, why=decision.outcome, runbook=audit
                ),
            )
            return _finish(p, RotationOutcome(outcome="not_rotated", **outcome))
        switched = p.step(
            "switch",
            lambda s: dkim_rotation.switch(
                s,
                name,
                new,
                now=p.now(),
                overlap_days=spec.overlap_days,
                actor=p.actor,
                runbook=audit,
                approval_id=decision.approval_id,
                approved_by=decision.decided_by or "",
            ),
        )
        logger.info("%s signs with %s; %s retire at %s", name, new, old, switched["retire_at"])
        p.sleep_until(
            "overlap", _aware(switched["retire_at"]), waiting_for=f"overlap of {name}'s old keys"
        )
        retired = p.step(
            "retire",
            lambda s: dkim_rotation.retire(s, name, now=p.now(), actor=p.actor, runbook=audit),
        )
        notice = p.step(
            "notify",
            lambda s: customer_mail.send_notice(
                s,
                settings,
                domains.get_tenant_name(s, name),
                "email_dkim_rotated",
                actor=p.actor,
                domain=name,
                since=f"{_aware(switched['retire_at']) - timedelta(days=spec.overlap_days):%Y-%m-%d %H:%M} UTC",
                records=retired["records"],
            ),
        )
        return _finish(
            p,
            RotationOutcome(
                outcome="rotated", retired=retired["retired"], notice=notice, **outcome
            ),
        )


def _start_due(settings) -> RotationOutcome:
    """The scheduled run: one query; a run of the on-demand deployment per due domain."""
    logger = get_run_logger()
    spec = rules().spec
    engine = resources.engine_for(settings)
    now = clock_for(settings.environment, engine).now()
    with session_scope(engine) as session:
        found = dkim_rotation.due(
            session, now=now, rotate_after_days=spec.rotate_after_days, limit=spec.max_per_run
        )
    if not found:
        logger.info("no domain's keys are due for rotation")
        return RotationOutcome(outcome="nothing_due")
    from prefect.deployments import run_deployment

    for name in found:
        run_deployment(ON_DEMAND, parameters={"domain": name}, timeout=0)
    logger.info("rotation started for %s", ", ".join(found))
    return RotationOutcome(outcome="started", started=found)


def _send_records(session, settings, p: ProcedureRun, name: str, new: list[str], until) -> dict:
    domain = domains.get_domain(session, name)
    keys = [k for k in domains.keys_in(session, domain) if k.selector in new]
    records = domains.domain_records(
        session, name, settings.hostname, settings.dmarc_mailbox, keys=keys
    )
    return customer_mail.send_notice(
        session,
        settings,
        domains.get_tenant_name(session, name),
        "email_domain_records",
        actor=p.actor,
        domain=name,
        records=[r.as_json() for r in records if r.kind == "dkim"],
        rotation=True,
        recheck=f"{rules().spec.recheck_seconds // 60} minutes",
        deadline=f"{until:%Y-%m-%d %H:%M} UTC",
    )


def _check(session, settings, name: str, new: list[str], p: ProcedureRun) -> dict:
    """Passed when DNS shows every new key's record as ours (the rest is domain-health's)."""
    now = p.now()
    result = dns_checks.check_and_record(session, name, settings, now=now)
    wanted = {f"dkim:{selector}" for selector in new}
    rows = [c for c in result.checks if c.name in wanted]
    return {
        "passed": len(rows) == len(wanted) and all(c.ok for c in rows),
        "checks": [{"name": c.name, "ok": c.ok, "reason": c.reason} for c in rows],
        "at": now.isoformat(),
    }


def _finish(p: ProcedureRun, outcome: RotationOutcome) -> RotationOutcome:
    p.finish(outcome.model_dump(mode="json"))
    return outcome


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
