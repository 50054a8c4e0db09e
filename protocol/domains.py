"""Sending domains: their DKIM keys, the DNS records to publish, and break-glass activation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import Session, select

from models import (
    DkimKey,
    Domain,
    DomainState,
    KeyState,
)
from models.audit_trail import record
from protocol.errors import DOMAIN_NAME, ServiceError, operator_actor
from protocol.operators import permitted
from protocol.tenants import get_tenant
from relay.submission.dkim import generate_key, selector_for, txt_record_value
from relay.submission.keystore import KeyBox
from runbooks.loader import dkim_signing

# The checkpoint kind whose roles may activate a domain, by hand or in the onboarding runbook.
ACTIVATE = "domain.activate"


def get_domain(session: Session, name: str) -> Domain:
    domain = session.exec(select(Domain).where(Domain.name == name.lower())).first()
    if domain is None:
        raise ServiceError(f"domain {name!r} does not exist")
    return domain


@dataclass(frozen=True)
class DnsRecord:
    name: str
    type: str
    value: str
    purpose: str


def add_domain(session: Session, keybox: KeyBox, tenant_name: str, domain_name: str) -> Domain:
    tenant = get_tenant(session, tenant_name)
    name = domain_name.lower().rstrip(".")
    if not DOMAIN_NAME.match(name):
        raise ServiceError(f"domain {domain_name!r} is not a valid domain name")
    if session.exec(select(Domain).where(Domain.name == name)).first():
        raise ServiceError(f"domain {name!r} already exists")
    domain = Domain(tenant_id=tenant.id, name=name)
    session.add(domain)
    session.flush()
    spec = dkim_signing().spec
    algorithms = ["rsa", "ed25519"] if spec.sign_ed25519 else ["rsa"]
    for algorithm in algorithms:
        key = generate_key(algorithm, spec.rsa_bits)
        session.add(
            DkimKey(
                domain_id=domain.id,
                selector=selector_for(spec, algorithm),
                algorithm=algorithm,
                private_key_encrypted=keybox.seal(key.private_material),
                public_key=key.public_value,
            )
        )
    record(
        session,
        actor="cli",
        action="domain.add",
        subject=f"domain:{name}",
        evidence={"tenant": tenant_name},
    )
    return domain


def domain_records(session: Session, domain_name: str, relay_hostname: str) -> list[DnsRecord]:
    """What the customer must publish: DKIM keys, SPF and DMARC (see runbooks templates)."""
    domain = get_domain(session, domain_name)
    keys = session.exec(
        select(DkimKey).where(DkimKey.domain_id == domain.id, DkimKey.state != KeyState.retired)
    ).all()
    records = [
        DnsRecord(
            f"{k.selector}._domainkey.{domain.name}",
            "TXT",
            txt_record_value(k.algorithm, k.public_key),
            f"DKIM ({k.algorithm})",
        )
        for k in sorted(keys, key=lambda k: k.algorithm != "rsa")
    ]
    records.append(
        DnsRecord(domain.name, "TXT", f"v=spf1 include:_spf.{relay_hostname} ~all", "SPF")
    )
    records.append(
        DnsRecord(
            f"_dmarc.{domain.name}",
            "TXT",
            f"v=DMARC1; p=none; rua=mailto:dmarc@{relay_hostname}; adkim=r; aspf=r",
            "DMARC (start at p=none, tighten once reports are clean)",
        )
    )
    return records


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
    session: Session, domain_name: str, actor: str, reason: str, *, manual: bool = False
) -> Domain:
    """The activation itself, for callers that made their own checks: `axiom up`'s sandbox demo
    domain (the sandbox DNS serves its records), the onboarding runbook after its checkpoint,
    test fixtures. Its DKIM keys start signing; audited under `actor`."""
    domain = get_domain(session, domain_name)
    if domain.state == DomainState.active:
        raise ServiceError(f"domain {domain.name!r} is already active")
    previous = domain.state
    domain.state = DomainState.active
    domain.activated_at = datetime.now(UTC)
    keys = session.exec(
        select(DkimKey).where(DkimKey.domain_id == domain.id, DkimKey.state == KeyState.pending)
    ).all()
    for key in keys:
        key.state = KeyState.active
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
        },
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
