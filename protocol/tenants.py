"""Tenants and how they prove who they are: SMTP credentials and bound client networks.

Each action is audited; the caller owns the commit, so the change and its audit entry land
together or not at all.
"""

from __future__ import annotations

import ipaddress

from sqlmodel import Session, col, func, select

from models import (
    ClientNetwork,
    Credential,
    Message,
    Recipient,
    RecipientState,
    Tenant,
)
from models.audit_trail import record
from protocol.errors import NAME, ServiceError
from protocol.verbs import Act, of_tenant, wake
from relay.spool.claims import TENANT_PAUSED_WAIT
from relay.submission.auth import generate_password, hash_password


def get_tenant(session: Session, name: str) -> Tenant:
    tenant = session.exec(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        raise ServiceError(f"tenant {name!r} does not exist")
    return tenant


def add_tenant(session: Session, name: str, language: str = "it") -> Tenant:
    if not NAME.match(name):
        raise ServiceError(f"tenant name {name!r} must be lowercase letters, digits and '-'")
    if language not in ("it", "en"):
        raise ServiceError(f"language {language!r} must be 'it' or 'en'")
    if session.exec(select(Tenant).where(Tenant.name == name)).first():
        raise ServiceError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, language=language)
    session.add(tenant)
    session.flush()
    record(session, actor="cli", action="tenant.add", subject=f"tenant:{name}")
    return tenant


def add_credential(session: Session, tenant_name: str, username: str) -> str:
    """Creates the credential and returns its password, which is stored only as a hash."""
    tenant = get_tenant(session, tenant_name)
    if not username or len(username) > 128 or any(c.isspace() for c in username):
        raise ServiceError(f"username {username!r} must be 1-128 characters without spaces")
    if session.exec(select(Credential).where(Credential.username == username)).first():
        raise ServiceError(f"username {username!r} already exists")
    password = generate_password()
    session.add(
        Credential(tenant_id=tenant.id, username=username, password_hash=hash_password(password))
    )
    record(
        session,
        actor="cli",
        action="credential.add",
        subject=f"tenant:{tenant_name}",
        evidence={"username": username},
    )
    return password


def add_network(session: Session, tenant_name: str, cidr: str) -> ClientNetwork:
    tenant = get_tenant(session, tenant_name)
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ServiceError(f"CIDR {cidr!r} is not a valid IPv4 or IPv6 network") from None
    if network.prefixlen == 0:
        raise ServiceError(f"CIDR {cidr!r} would bind every address; refused")
    text = str(network)
    if session.exec(select(ClientNetwork).where(ClientNetwork.cidr == text)).first():
        raise ServiceError(f"network {text} is already bound to a tenant")
    bound = ClientNetwork(tenant_id=tenant.id, cidr=text)
    session.add(bound)
    record(
        session,
        actor="cli",
        action="network.add",
        subject=f"tenant:{tenant_name}",
        evidence={"cidr": text},
    )
    return bound


def queued_recipients(session: Session, tenant_id: int, stream: str | None = None) -> int:
    query = (
        select(func.count())
        .select_from(Recipient)
        .join(Message, col(Message.id) == Recipient.message_id)
        .where(Message.tenant_id == tenant_id, Recipient.state == RecipientState.queued)
    )
    if stream is not None:
        query = query.where(Message.stream == stream)
    return session.exec(query).one()


def pause_tenant(session: Session, name: str, act: Act) -> Tenant:
    """Stop the tenant's sending: the relay answers its MAIL FROM with 451 4.7.1 (within the
    policy cache's few seconds) and postpones its queued mail without spending attempts."""
    tenant = get_tenant(session, name)
    if tenant.paused:
        raise ServiceError(f"tenant {name!r} is already paused")
    tenant.paused = True
    session.add(tenant)
    act.audit(
        session,
        "tenant.pause",
        f"tenant:{name}",
        {"queued_recipients": queued_recipients(session, tenant.id)},
    )
    return tenant


def resume_tenant(session: Session, name: str, act: Act) -> tuple[Tenant, int]:
    """Let the tenant send again and wake its mail that waited; returns how many woke."""
    tenant = get_tenant(session, name)
    if not tenant.paused:
        raise ServiceError(f"tenant {name!r} is not paused")
    tenant.paused = False
    session.add(tenant)
    session.flush()
    woken = wake(session, act.now, messages=of_tenant(tenant.id), reply_like=[TENANT_PAUSED_WAIT])
    act.audit(session, "tenant.resume", f"tenant:{name}", {"woken": woken})
    return tenant, woken
