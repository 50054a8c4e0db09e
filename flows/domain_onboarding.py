"""Runbook "domain onboarding" (runbooks/domain-onboarding.yaml): keys → records → wait for
DNS → pool decision → checkpoint → active, or pending with a notice naming what is missing.

The wait holds no process: each DNS check is a step that records when the next one is due, and
the run sleeps on the procedure's clock (flows/procedure.py) until then; a run started again
replays the checks already made instead of repeating them. The logic lives in the services:
protocol/domains.py (keys, records), protocol/dns_checks.py (the checks), protocol/onboarding.py
(the pool rule and the activation).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, ProcedureRun, procedure
from models import DomainState, KeyState
from notifications import customer_mail
from notifications.templates import render
from protocol import dns_checks, domains, onboarding
from protocol.errors import ServiceError
from protocol.tenants import get_tenant
from relay.submission.keystore import KeyBox
from runbooks.loader import domain_onboarding as rules

StreamKindField = Literal["transactional", "marketing", "mixed"]


class OnboardingOutcome(BaseModel):
    """What the run did, for the UI and for scripts."""

    outcome: Literal["activated", "not_activated", "dry_run", "already_active", "deadline"]
    tenant: str
    domain: str
    stream: str
    checks_passed: bool = False
    missing: list[dict] = Field(default_factory=list)
    proposal: dict | None = None
    approval_id: int | None = None
    decision: str | None = None
    decided_by: str | None = None
    activation: dict | None = None
    detail: str | None = None
    notice: dict | None = None


@flow(name="domain-onboarding", log_prints=False)
def domain_onboarding(
    tenant: str,
    domain: str,
    stream_kind: StreamKindField,
    expected_per_day: Annotated[int, Field(ge=0)],
    expected_per_month: Annotated[int, Field(ge=0)],
    sending_days_per_week: Annotated[int, Field(ge=1, le=7)],
    list_source: onboarding.ListSource = "opt_in",
    list_age_months: Annotated[int, Field(ge=0)] = 0,
    stream: str | None = None,
    dry_run: bool = False,
    procedure_id: ProcedureId = None,
) -> OnboardingOutcome:
    """Onboard a sending domain: publish-and-check its DNS, propose a pool, ask a lead.

    Args:
        tenant: The tenant (customer) name.
        domain: The sending domain, e.g. shop.example (created with new DKIM keys if new).
        stream_kind: What the stream sends: transactional, marketing or mixed.
        expected_per_day: Messages the customer expects to send on a sending day.
        expected_per_month: Messages the customer expects to send in a month.
        sending_days_per_week: Days a week the customer sends (1 to 7); regular is 5 or more.
        list_source: Where the recipients come from; purchased or rented draw a warning.
        list_age_months: Age of the recipient list in months; old lists draw a warning.
        stream: The stream's name (default: the stream kind).
        dry_run: Check DNS and ask for approval, but activate nothing.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    logger = get_run_logger()
    settings = resources.settings()
    runbook = rules()
    spec = runbook.spec
    name = domain.lower().rstrip(".")
    stream_name = stream or stream_kind
    declared = onboarding.Declared(
        stream_kind,
        expected_per_day,
        expected_per_month,
        sending_days_per_week,
        list_source,
        list_age_months,
    )
    base = {"tenant": tenant, "domain": name, "stream": stream_name}
    with procedure(runbook, subject=f"domain:{name}", procedure_id=procedure_id) as p:
        keys = p.step("keys", lambda s: _keys(s, settings, tenant, name, p))
        if keys["state"] == DomainState.active:
            logger.info("%s is already active; nothing to do", name)
            return _finish(p, OnboardingOutcome(outcome="already_active", **base))
        deadline = p.step(
            "deadline", lambda s: {"at": (p.now() + timedelta(days=spec.deadline_days)).isoformat()}
        )
        until = _aware(deadline["at"])
        p.step("records", lambda s: _send_records(s, settings, p, tenant, name, until))

        check = p.poll(
            "check",
            lambda s: _check(s, settings, name, p),
            until=until,
            every=timedelta(seconds=spec.recheck_seconds),
            waiting_for=f"DNS of {name}",
        )
        _artifact(name, check, None, settings)
        if not check["passed"]:
            logger.info("%s: DNS not right by the deadline; stays pending", name)
            notice = p.step(
                "notify",
                lambda s: _notice_missing(s, settings, p, tenant, name, "deadline", check, None),
            )
            return _finish(
                p,
                OnboardingOutcome(
                    outcome="deadline", missing=check["missing"], notice=notice, **base
                ),
            )

        evidence = onboarding.PoolEvidence.from_json(
            p.step(
                "evidence",
                lambda s: onboarding.read_pools(s, tenant, stream_name, declared).as_json(),
            )
        )
        proposal = onboarding.decide_pool(evidence, spec.pool_rule)
        _artifact(name, check, proposal, settings)
        decision = request_approval(
            kind=spec.checkpoint,
            subject=f"domain:{name}",
            proposal={
                "action": f"activate {name} for {tenant}/{stream_name}",
                **dict(_rows(proposal)),
                "choose the other pool": f"approve with the comment pool={proposal.alternative}",
                "dry run": dry_run,
            },
            evidence={
                "declared": f"{stream_kind}, {expected_per_month:,}/month, "
                f"{sending_days_per_week} days/week, list {list_source} "
                f"({list_age_months} months)",
                "dns": f"all {len(check['checks'])} checks pass (axiom domain check {name})",
                "records": p.step("published", lambda s: _record_names(s, settings, name))[
                    "records"
                ],
                # warnings do not stop a domain; the approver sees them
                **{c["name"]: c["reason"] for c in check["checks"] if not c["ok"]},
            },
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        outcome = {
            **base,
            "checks_passed": True,
            "proposal": proposal.as_json(),
            "approval_id": decision.approval_id,
            "decision": decision.outcome,
            "decided_by": decision.decided_by,
        }
        if not decision.approved:
            notice = p.step(
                "notify",
                lambda s: _notice_missing(
                    s, settings, p, tenant, name, "rejected", check, decision.comment
                ),
            )
            return _finish(p, OnboardingOutcome(outcome="not_activated", notice=notice, **outcome))
        try:
            choice = onboarding.choose_pool(proposal, decision.comment, evidence, spec.pool_rule)
        except ServiceError as refused:
            logger.warning("not activating %s: %s", name, refused)
            return _finish(
                p, OnboardingOutcome(outcome="not_activated", detail=str(refused), **outcome)
            )
        if dry_run:
            return _finish(p, OnboardingOutcome(outcome="dry_run", **outcome))
        activation = p.step(
            "activate",
            lambda s: onboarding.activate(
                s,
                tenant=tenant,
                domain_name=name,
                stream=stream_name,
                declared=declared,
                choice=choice,
                approval_id=decision.approval_id,
                approved_by=decision.decided_by or "",
                actor=p.actor,
                now=p.now(),
                runbook=(runbook.id, runbook.version),
            ),
        )
        logger.info("%s is active on pool %s", name, activation["pool"])
        p.step("warmup", lambda s: _start_warmups(activation["cold_ips"]))
        notice = p.step(
            "notify",
            lambda s: customer_mail.send_notice(
                s,
                settings,
                tenant,
                "email_domain_activated",
                actor=p.actor,
                domain=name,
                at=f"{p.now():%Y-%m-%d %H:%M} UTC",
                pool_kind=activation["pool_kind"],
            ),
        )
        return _finish(
            p,
            OnboardingOutcome(outcome="activated", activation=activation, notice=notice, **outcome),
        )


def _start_warmups(cold_ips: list[str]) -> dict:
    """The pool's cold IPs carry no traffic until a plan covers them: a run of
    ip-warmup/on-demand for each, which asks warmup.start (not twice for one IP)."""
    from prefect.deployments import run_deployment

    from flows.ip_warmup import ON_DEMAND, open_procedure

    started = []
    for address in cold_ips:
        if open_procedure(f"ip:{address}", "start"):
            continue
        run = run_deployment(
            ON_DEMAND, parameters={"action": "start", "ip": address}, timeout=0, as_subflow=False
        )
        started.append({"ip": address, "flow_run_id": str(run.id)})
    return {"started": started}


def _keys(session, settings, tenant: str, name: str, p: ProcedureRun) -> dict:
    """Create the domain (pending, with new keys) or reuse the keys it has."""
    try:
        found = domains.get_domain(session, name)
    except ServiceError:
        keybox = KeyBox(settings.load_secret_key())
        found = domains.add_domain(session, keybox, tenant, name, actor=p.actor, now=p.now())
    if get_tenant(session, tenant).id != found.tenant_id:
        raise ServiceError(f"domain {name!r} belongs to another tenant")
    keys = domains.keys_in(session, found, KeyState.pending, KeyState.active)
    return {"state": str(found.state), "keys": [k.selector for k in keys]}


def _send_records(session, settings, p: ProcedureRun, tenant: str, name: str, until) -> dict:
    records = domains.domain_records(session, name, settings.hostname, settings.dmarc_mailbox)
    return customer_mail.send_notice(
        session,
        settings,
        tenant,
        "email_domain_records",
        actor=p.actor,
        domain=name,
        records=[r.as_json() for r in records],
        recheck=_for_people(rules().spec.recheck_seconds),
        deadline=f"{until:%Y-%m-%d %H:%M} UTC",
    )


def _record_names(session, settings, name: str) -> dict:
    """The records the approver is shown (runbooks/dns-records.yaml), by name and type."""
    records = domains.domain_records(session, name, settings.hostname, settings.dmarc_mailbox)
    return {"records": ", ".join(f"{r.name} {r.type}" for r in records)}


def _check(session, settings, name: str, p: ProcedureRun) -> dict:
    now = p.now()
    result = dns_checks.check_and_record(session, name, settings, now=now)
    return {
        "passed": result.passed,
        "checks": [{"name": c.name, "ok": c.ok, "reason": c.reason} for c in result.checks],
        "missing": [{"name": c.name, "reason": c.reason} for c in result.missing()],
        "at": now.isoformat(),
    }


def _notice_missing(session, settings, p, tenant, name, why, check, comment) -> dict:
    return customer_mail.send_notice(
        session,
        settings,
        tenant,
        "email_domain_not_activated",
        actor=p.actor,
        domain=name,
        why=why,
        at=f"{p.now():%Y-%m-%d %H:%M} UTC",
        comment=comment,
        missing=check["missing"],
    )


def _artifact(name: str, check: dict, proposal, settings) -> None:
    create_markdown_artifact(
        key=f"domain-{name.replace('.', '-')}",
        markdown=render(
            "prefect_domain_check",
            settings.slack_language,
            domain=name,
            passed=check["passed"],
            at=f"{_aware(check['at']):%Y-%m-%d %H:%M} UTC",
            checks=check["checks"],
            proposal=_rows(proposal) if proposal else None,
        ),
        description=f"DNS checks of {name}",
    )


def _rows(proposal: onboarding.PoolProposal) -> list[tuple[str, str]]:
    return proposal.rows()


def _finish(p: ProcedureRun, outcome: OnboardingOutcome) -> OnboardingOutcome:
    p.finish(outcome.model_dump(mode="json"))
    return outcome


def _aware(text: str) -> datetime:
    """A time read back from a step (ISO 8601; steps hold JSON)."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _for_people(seconds: int) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"
