"""Sending domains: their DKIM keys, the DNS records to publish, and break-glass activation."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session, select

from models import (
    DkimKey,
    Domain,
    DomainState,
    KeyState,
    Tenant,
)
from models.audit_trail import record
from protocol.errors import DOMAIN_NAME, ServiceError, operator_actor
from protocol.operators import permitted
from protocol.tenants import get_tenant
from relay.submission.dkim import generate_key, selector_for
from relay.submission.keystore import KeyBox
from runbooks.loader import dkim_signing, dns_records, domain_onboarding
from runbooks.records import DnsRecord, PublishedKey, render_records

__all__ = ["ACTIVATE", "DnsRecord", "add_domain", "domain_records", "get_domain"]

# The checkpoint kind whose roles may activate a domain, by hand or in the onboarding runbook.
ACTIVATE = "domain.activate"


def get_domain(session: Session, name: str) -> Domain:
    domain = session.exec(select(Domain).where(Domain.name == name.lower().rstrip("."))).first()
    if domain is None:
        raise ServiceError(f"domain {name!r} does not exist")
    return domain


def get_tenant_name(session: Session, domain_name: str) -> str:
    """The name of the tenant a domain belongs to (whose contact its notices go to)."""
    domain = get_domain(session, domain_name)
    tenant = session.get(Tenant, domain.tenant_id)
    return tenant.name if tenant else ""


def add_domain(
    session: Session,
    keybox: KeyBox,
    tenant_name: str,
    domain_name: str,
    *,
    actor: str = "cli",
    now: datetime | None = None,
) -> Domain:
    tenant = get_tenant(session, tenant_name)
    name = domain_name.lower().rstrip(".")
    if not DOMAIN_NAME.match(name):
        raise ServiceError(f"domain {domain_name!r} is not a valid domain name")
    if session.exec(select(Domain).where(Domain.name == name)).first():
        raise ServiceError(f"domain {name!r} already exists")
    domain = Domain(tenant_id=tenant.id, name=name)
    session.add(domain)
    session.flush()
    keys = new_keys(session, keybox, domain, now=now)
    record(
        session,
        actor=actor,
        action="domain.add",
        subject=f"domain:{name}",
        evidence={"tenant": tenant_name, "keys": [k.selector for k in keys]},
        at=now,
    )
    return domain


def new_keys(
    session: Session, keybox: KeyBox, domain: Domain, *, now: datetime | None = None
) -> list[DkimKey]:
    """A pending key per algorithm of runbooks/dkim-signing.yaml, each under a selector never
    used for the domain before: the date and the next free counter (unique in the database)."""
    spec = dkim_signing().spec
    algorithms = ["rsa", "ed25519"] if spec.sign_ed25519 else ["rsa"]
    used = set(session.exec(select(DkimKey.selector).where(DkimKey.domain_id == domain.id)).all())
    made = []
    for algorithm in algorithms:
        counter = 1
        while (selector := selector_for(spec, algorithm, now, counter)) in used:
            counter += 1
        key = generate_key(algorithm, spec.rsa_bits)
        row = DkimKey(
            domain_id=domain.id,
            selector=selector,
            algorithm=algorithm,
            private_key_encrypted=keybox.seal(key.private_material),
            public_key=key.public_value,
        )
        session.add(row)
        made.append(row)
    session.flush()
    return made


def keys_in(session: Session, domain: Domain, *states: KeyState) -> list[DkimKey]:
    """The domain's keys in these states (every state but retired when none are named: the
    keys whose records must be in DNS), oldest first."""
    wanted = states or (KeyState.pending, KeyState.active, KeyState.retiring)
    return list(
        session.exec(
            select(DkimKey)
            .where(DkimKey.domain_id == domain.id, DkimKey.state.in_(wanted))  # type: ignore[attr-defined]
            .order_by(DkimKey.id)
        ).all()
    )


def return_path_of(domain: Domain) -> str:
    """The domain's return-path subdomain: the one named, else <label>.<domain>."""
    label = domain_onboarding().spec.return_path_label
    return domain.return_path_domain or f"{label}.{domain.name}"


def domain_records(
    session: Session,
    domain_name: str,
    relay_hostname: str,
    dmarc_address: str | None = None,
    keys: list[DkimKey] | None = None,
) -> list[DnsRecord]:
    """What the customer must publish (runbooks/dns-records.yaml): DKIM keys, SPF, DMARC and
    the return-path subdomain's MX and SPF. `keys`: only these (a rotation's new ones)."""
    domain = get_domain(session, domain_name)
    chosen = keys_in(session, domain) if keys is None else keys
    return render_records(
        dns_records().spec,
        domain=domain.name,
        keys=[PublishedKey(k.selector, k.algorithm, k.public_key) for k in chosen],
        relay_hostname=relay_hostname,
        dmarc_address=dmarc_address or f"dmarc@{relay_hostname}",
        return_path=return_path_of(domain),
    )


def activate_domain(session: Session, domain_name: str, operator: str, reason: str) -> Domain:
    """Break-glass activation by a registered operator whose role may answer `domain.activate`.

    The same people who may approve the onboarding runbook's activation checkpoint may do it by
    hand (runbooks/checkpoints.yaml); anyone else is refused, and the refusal is audited.
    """
    if not operator.strip():
        raise ServiceError("--as must name the operator")
    if not reason.strip():
        raise ServiceError("--reason must say why the domain is activated by hand")
    domain = get_domain(session, domain_name)
    if domain.state == DomainState.active:
        raise ServiceError(f"domain {domain.name!r} is already active")
    _check_may_activate(session, operator, domain.name, reason)
    return mark_domain_active(session, domain.name, operator_actor(operator), reason, manual=True)


def mark_domain_active(
    session: Session,
    domain_name: str,
    actor: str,
    reason: str,
    *,
    manual: bool = False,
    now: datetime | None = None,
    evidence: dict | None = None,
    runbook: tuple[str, str] | None = None,
) -> Domain:
    """The activation itself, for callers that made their own checks: `axiom up`'s sandbox demo
    domain (the sandbox DNS serves its records), the onboarding runbook after its checkpoint,
    test fixtures. Its DKIM keys start signing; audited under `actor`."""
    domain = get_domain(session, domain_name)
    if domain.state == DomainState.active:
        raise ServiceError(f"domain {domain.name!r} is already active")
    previous = domain.state
    domain.state = DomainState.active
    at = now or datetime.now(UTC)
    domain.activated_at = at
    keys = keys_in(session, domain, KeyState.pending)
    for key in keys:
        key.state, key.activated_at = KeyState.active, at
        session.add(key)
    session.add(domain)
    record(
        session,
        actor=actor,
        action=ACTIVATE,
        subject=f"domain:{domain.name}",
        evidence={
            "reason": reason,
            "from_state": str(previous),
            "manual": manual,
            "keys": [k.selector for k in keys],
            **(evidence or {}),
        },
        runbook_id=runbook[0] if runbook else None,
        runbook_version=runbook[1] if runbook else None,
        at=now,
    )
    return domain


def _check_may_activate(session: Session, name: str, domain: str, reason: str) -> None:
    operator, refusal = permitted(session, name, ACTIVATE, ACTIVATE)
    if operator is not None:
        return
    record(
        session,
        actor=operator_actor(name.strip()),
        action=f"{ACTIVATE}.refused",
        subject=f"domain:{domain}",
        evidence={"detail": refusal, "reason": reason, "manual": True},
    )
    # The caller rolls back on ServiceError; the refusal must outlive that, and nothing else
    # has been written in this transaction (the checks above only read).
    session.commit()
    raise ServiceError(f"refused: {refusal}")


def describe(session: Session, domain_name: str) -> dict:
    """A domain as the domain runbooks read it: state, keys, return path, last DNS check, the
    open procedures about it, and what its tenant's streams declared (`axiom domain show`)."""
    from models import IpPool, Procedure, ProcedureState, Stream

    domain = get_domain(session, domain_name)
    keys = session.exec(
        select(DkimKey).where(DkimKey.domain_id == domain.id).order_by(DkimKey.id)
    ).all()
    checks = domain.dns_checks or {}
    subjects = (f"domain:{domain.name}", f"domain:{domain.name}/dkim")
    procedures = session.exec(
        select(Procedure).where(
            Procedure.subject.in_(subjects),  # type: ignore[attr-defined]
            Procedure.state.in_(ProcedureState.OPEN),  # type: ignore[attr-defined]
        )
    ).all()
    streams = session.exec(select(Stream).where(Stream.tenant_id == domain.tenant_id)).all()

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "domain": domain.name,
        "tenant": get_tenant_name(session, domain.name),
        "state": str(domain.state),
        "activated_at": when(domain.activated_at),
        "return_path": return_path_of(domain),
        "return_path_published": domain.return_path_published_at is not None,
        "keys": [
            {
                "selector": k.selector,
                "algorithm": k.algorithm,
                "state": str(k.state),
                "activated_at": when(k.activated_at),
                "retire_at": when(k.retire_at),
            }
            for k in keys
        ],
        "dns": {
            "checked_at": when(domain.dns_checked_at),
            "passed": checks.get("passed"),
            "failing": [c["name"] for c in checks.get("checks", []) if not c.get("ok")],
        },
        "procedures": [
            {"id": p.id, "name": p.name, "state": p.state, "waiting_for": p.waiting_for}
            for p in procedures
        ],
        "streams": [
            {
                "stream": s.name,
                "pool": (pool.name if (pool := session.get(IpPool, s.pool_id)) else None),
                "kind": s.kind,
                "per_day": s.declared_per_day,
                "per_month": s.declared_per_month,
                "days_per_week": s.sending_days_per_week,
                "list_source": s.list_source,
                "list_age_months": s.list_age_months,
            }
            for s in streams
        ],
    }
