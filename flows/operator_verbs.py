"""The operator verbs as small runbook flows: read the state → checkpoint → act → report.

Each lifts or changes a state a person must decide on (runbooks/operator-verbs.yaml names the
checkpoint kind of each), so each asks request_approval() with the state it read as evidence,
and acts only once approved, through the same service as the CLI (protocol/), audited with
actor `flow:<run id>` and the approver. Typed at the CLI with --as, the same verb is the
person's act itself and asks nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from flows import resources
from flows.checkpoint import request_approval
from flows.procedure import ProcedureId, procedure
from models import IpAddress, IpPool, IpState, Stream, Suspension
from models.audit import as_utc
from models.db import session_scope
from models.sandbox_clock import clock_for
from notifications import customer_mail
from protocol import egress, suspensions, tenants
from protocol.errors import ServiceError
from protocol.verbs import by_flow
from runbooks.loader import operator_verbs

Reason = Annotated[
    str, Field(min_length=3, description="Why; shown to the approver and kept in the audit trail")
]


class VerbOutcome(BaseModel):
    """What the run did, for the UI and for scripts."""

    verb: str
    subject: str
    outcome: Literal["done", "not_done", "nothing_to_do"]
    approval_id: int | None = None
    decision: str | None = None
    decided_by: str | None = None
    detail: dict = Field(default_factory=dict)


def _verb(
    verb: str,
    subject: str,
    proposal: str,
    reason: str,
    read: Callable[[Session], dict],
    act: Callable[..., dict],
    procedure_id: int | None,
    notify: Callable[[Session, str, dict], dict] | None = None,
) -> VerbOutcome:
    """read the state → checkpoint → act → notify the customer, as a durable procedure: each
    step once, the wait for the approver held by no process (flows/procedure.py)."""
    logger = get_run_logger()
    settings = resources.settings()
    runbook = operator_verbs()
    spec = runbook.spec.verb(verb)
    with procedure(runbook, subject=subject, procedure_id=procedure_id, settings=settings) as p:
        try:
            evidence = p.step("read", read)  # the evidence the approver sees
        except ServiceError as exc:
            logger.info("%s on %s: nothing to do (%s)", verb, subject, exc)
            outcome = VerbOutcome(
                verb=verb, subject=subject, outcome="nothing_to_do", detail={"why": str(exc)}
            )
            p.finish(outcome.model_dump())
            return outcome
        decision = request_approval(
            kind=spec.checkpoint,
            subject=subject,
            proposal={"action": proposal, "reason": reason, "by hand": spec.command},
            evidence=evidence,
            settings=settings,
            runbook=runbook,
            procedure=p,
        )
        base = {
            "verb": verb,
            "subject": subject,
            "approval_id": decision.approval_id,
            "decision": decision.outcome,
            "decided_by": decision.decided_by,
        }
        if not decision.approved:
            logger.info("%s on %s not done: approval %s", verb, subject, decision.outcome)
            outcome = VerbOutcome(outcome="not_done", detail=evidence, **base)
        else:
            who = by_flow(
                p.flow_run_id, reason, p.now(), decision.approval_id, decision.decided_by or ""
            )
            done = p.step("act", lambda session: act(session, who))  # with its audit entry
            logger.info("%s on %s done: %s", verb, subject, done)
            if notify is not None:  # the mail is sent once; the step records what was sent
                notice = p.step("notify", lambda session: notify(session, p.actor, done))
                logger.info("%s", notice["said"])
                done = {**done, "notice": notice}
            outcome = VerbOutcome(outcome="done", detail=done, **base)
        p.finish(outcome.model_dump())
        return outcome


# --- suspensions ---
def _suspension(session: Session, suspension_id: int) -> dict:
    row = suspensions.get_suspension(session, suspension_id)
    if as_utc(row.expires_at) <= _now():
        raise ServiceError(f"suspension {suspension_id} already ended")
    return {
        "path": f"{row.source_ip} → {row.provider}",
        "action": row.action,
        "until": f"{as_utc(row.expires_at):%Y-%m-%d %H:%M:%S}Z",
        "why": row.reason,
        "rule": row.rule_id or "",
    }


def _path(suspension_id: int) -> str:
    with session_scope(resources.engine_for(resources.settings())) as session:
        row = session.get(Suspension, suspension_id)
        return f"path:{row.source_ip}/{row.provider}" if row else f"suspension:{suspension_id}"


@flow(name="lift-suspension")
def lift_suspension(
    suspension_id: Annotated[int, Field(description="The suspension's id (`axiom suspensions`)")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """End a protective suspension of an (IP, provider) path now, once a person approves.

    Args:
        suspension_id: The suspension's id, as `axiom suspensions` lists it.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """

    def act(session: Session, who) -> dict:
        row, woken = suspensions.lift_suspension(session, suspension_id, who)
        return {"lifted": row.id, "woken": woken}

    return _verb(
        "suspension.lift",
        _path(suspension_id),
        f"lift suspension {suspension_id} now and send the mail it held",
        reason,
        lambda s: _suspension(s, suspension_id),
        act,
        procedure_id,
    )


@flow(name="shorten-suspension")
def shorten_suspension(
    suspension_id: Annotated[int, Field(description="The suspension's id (`axiom suspensions`)")],
    until: Annotated[datetime, Field(description="Its new expiry (UTC), before the current one")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Bring a suspension's expiry forward, once a person approves.

    Args:
        suspension_id: The suspension's id, as `axiom suspensions` lists it.
        until: Its new expiry (UTC when no offset is given), before the current one.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    new_until = as_utc(until)

    def act(session: Session, who) -> dict:
        _, woken = suspensions.shorten_suspension(session, suspension_id, new_until, who)
        return {"until": new_until.isoformat(), "woken": woken}

    return _verb(
        "suspension.shorten",
        _path(suspension_id),
        f"end suspension {suspension_id} at {new_until:%Y-%m-%d %H:%M:%S}Z instead",
        reason,
        lambda s: _suspension(s, suspension_id),
        act,
        procedure_id,
    )


# --- tenants ---
def _tenant(session: Session, name: str, paused: bool) -> dict:
    tenant = tenants.get_tenant(session, name)
    if tenant.paused == paused:
        raise ServiceError(f"tenant {name!r} is {'already' if paused else 'not'} paused")
    return {"tenant": name, "queued recipients": tenants.queued_recipients(session, tenant.id)}


@flow(name="pause-tenant")
def pause_tenant(
    tenant: Annotated[str, Field(description="The tenant (customer) name")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Pause a tenant's sending (451 4.7.1 to new mail, queued mail waits), once approved.

    Args:
        tenant: The tenant (customer) name.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    return _verb(
        "tenant.pause",
        f"tenant:{tenant}",
        f"pause {tenant}: new submissions get 451 4.7.1, queued mail waits in the spool",
        reason,
        lambda s: _tenant(s, tenant, paused=True),
        lambda s, who: {
            "paused": tenants.pause_tenant(s, tenant, who).name,
            "queued_recipients": tenants.queued_recipients(s, tenants.get_tenant(s, tenant).id),
        },
        procedure_id,
        notify=lambda s, actor, done: _notice(
            s,
            actor,
            tenant,
            "email_tenant_paused",
            queued_recipients=done.get("queued_recipients", 0),
        ),
    )


@flow(name="resume-tenant")
def resume_tenant(
    tenant: Annotated[str, Field(description="The tenant (customer) name")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Resume a paused tenant and send what waited, once approved.

    Args:
        tenant: The tenant (customer) name.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    return _verb(
        "tenant.resume",
        f"tenant:{tenant}",
        f"resume {tenant} and send its waiting mail",
        reason,
        lambda s: _tenant(s, tenant, paused=False),
        lambda s, who: {"woken": tenants.resume_tenant(s, tenant, who)[1]},
        procedure_id,
        notify=lambda s, actor, done: _notice(
            s, actor, tenant, "email_tenant_resumed", woken=done.get("woken", 0)
        ),
    )


# --- streams ---
def _held(session: Session, tenant: str, stream: str) -> dict:
    owner = tenants.get_tenant(session, tenant)
    row = session.exec(
        select(Stream).where(Stream.tenant_id == owner.id, Stream.name == stream)
    ).first()
    pool = session.get(IpPool, row.pool_id) if row else None
    if pool is None or pool.name != egress.HOLD_POOL:
        raise ServiceError(f"{tenant}/{stream} is not held")
    return {
        "stream": f"{tenant}/{stream}",
        "queued recipients": tenants.queued_recipients(session, owner.id, stream),
    }


@flow(name="release-stream")
def release_stream(
    tenant: Annotated[str, Field(description="The tenant (customer) name")],
    stream: Annotated[str, Field(description="The held stream, e.g. marketing")],
    reason: Reason,
    pool: Annotated[
        str | None,
        Field(description="Bind to this pool; empty: the pool the hold left (from its audit)"),
    ] = None,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Release a held stream to its previous pool (or `pool`), once a person approves.

    Args:
        tenant: The tenant (customer) name.
        stream: The held stream, e.g. marketing.
        reason: Why; shown to the approver and kept in the audit trail.
        pool: Bind to this pool; empty: the pool the hold left, read from the audit of the hold.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """

    def act(session: Session, who) -> dict:
        _, bound, fallback, woken = egress.release_stream(session, tenant, stream, who, pool)
        return {"pool": bound, "fallback": fallback, "woken": woken}

    return _verb(
        "stream.release",
        f"stream:{tenant}/{stream}",
        f"bind {tenant}/{stream} to pool {pool or 'it left (from the audit of the hold)'}",
        reason,
        lambda s: _held(s, tenant, stream),
        act,
        procedure_id,
        notify=lambda s, actor, done: _notice(
            s, actor, tenant, "email_stream_released", stream=stream, woken=done.get("woken", 0)
        ),
    )


@flow(name="move-stream")
def move_stream(
    tenant: Annotated[str, Field(description="The tenant (customer) name")],
    stream: Annotated[str, Field(description="The stream to move, e.g. marketing")],
    reason: Reason,
    pool: Annotated[
        str | None,
        Field(description="The pool to move it to; empty: the stream's overflow pool"),
    ] = None,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Move a stream to another pool (its overflow pool, or `pool`), once a person approves.

    Args:
        tenant: The tenant (customer) name.
        stream: The stream to move, e.g. marketing.
        reason: Why; shown to the approver and kept in the audit trail.
        pool: The pool to move it to; empty: the stream's overflow pool.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    return _verb(
        "stream.move",
        f"stream:{tenant}/{stream}",
        f"bind {tenant}/{stream} to pool {pool or 'its overflow pool'} (no overflow)",
        reason,
        lambda s: egress.stream_binding(s, tenant, stream),
        lambda session, who: egress.move_stream(session, tenant, stream, who, pool),
        procedure_id,
    )


# --- paths ---
@flow(name="throttle-path")
def throttle_path(
    ip: Annotated[str, Field(description="The sending IP address")],
    provider: Annotated[str, Field(description="The provider, e.g. gmail, microsoft, yahoo")],
    per_minute: Annotated[int, Field(ge=1, description="At most this many messages a minute")],
    minutes: Annotated[int, Field(ge=1, le=10080, description="For this many minutes")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Slow one (IP, provider) path for a while, once a person approves.

    Args:
        ip: The sending IP address.
        provider: The provider, e.g. gmail, microsoft, yahoo.
        per_minute: At most this many messages a minute.
        minutes: For this many minutes; it ends by itself.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """

    def act(session: Session, who) -> dict:
        until = who.now + timedelta(minutes=minutes)
        row = suspensions.throttle_path(session, ip, provider, per_minute, until, who)
        return {"suspension_id": row.id, "until": until.isoformat(), "per_minute": per_minute}

    return _verb(
        "path.throttle",
        f"path:{ip}/{provider}",
        f"send at most {per_minute}/min from {ip} to {provider} for {minutes} min",
        reason,
        lambda s: {"path": f"{egress.get_ip(s, ip).address} → {provider}"},
        act,
        procedure_id,
    )


# --- source IPs ---
def _ip(session: Session, address: str, retired: bool) -> dict:
    ip = egress.get_ip(session, address)
    if (ip.state == IpState.retired) == retired:
        raise ServiceError(f"{ip.address} is {'already' if retired else 'not'} retired")
    pool = session.get(IpPool, ip.pool_id)
    others = session.exec(
        select(IpAddress).where(IpAddress.pool_id == ip.pool_id, IpAddress.id != ip.id)
    ).all()
    return {
        "address": ip.address,
        "state": str(ip.state),
        "pool": pool.name if pool else "",
        "other addresses in the pool": ", ".join(f"{o.address} ({o.state})" for o in others)
        or "none",
    }


@flow(name="retire-ip")
def retire_ip(
    address: Annotated[str, Field(description="The source IP address")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Retire a source IP (it stops sending), once a person approves.

    Args:
        address: The source IP address.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """
    return _verb(
        "ip.retire",
        f"ip:{address}",
        f"retire {address}: it stops sending",
        reason,
        lambda s: _ip(s, address, retired=True),
        lambda s, who: {"retired": egress.retire_ip(s, address, who).address},
        procedure_id,
    )


@flow(name="reinstate-ip")
def reinstate_ip(
    address: Annotated[str, Field(description="The retired source IP address")],
    reason: Reason,
    procedure_id: ProcedureId = None,
) -> VerbOutcome:
    """Return a retired source IP to its previous state, once a person approves.

    Args:
        address: The retired source IP address.
        reason: Why; shown to the approver and kept in the audit trail.
        procedure_id: Set by the sweep when it continues a procedure in a new run.
    """

    def act(session: Session, who) -> dict:
        ip, woken = egress.reinstate_ip(session, address, who)
        return {"state": str(ip.state), "woken": woken}

    return _verb(
        "ip.reinstate",
        f"ip:{address}",
        f"reinstate {address} in the state it had before its retirement",
        reason,
        lambda s: _ip(s, address, retired=False),
        act,
        procedure_id,
    )


FLOWS = [
    lift_suspension,
    shorten_suspension,
    pause_tenant,
    resume_tenant,
    release_stream,
    move_stream,
    throttle_path,
    retire_ip,
    reinstate_ip,
]


def _notice(session: Session, actor: str, tenant: str, notice: str, **variables) -> dict:
    """Tell the tenant's contact, in its language, through the relay (never raises)."""
    return customer_mail.send_notice(
        session,
        resources.settings(),
        tenant,
        notice,
        actor=actor,
        at=f"{_now():%Y-%m-%d %H:%M} UTC",
        **variables,
    )


def _now() -> datetime:
    """The Protocol's time: the sandbox clock in sandbox, the system's in production."""
    s = resources.settings()
    return clock_for(s.environment, resources.engine_for(s)).now()
