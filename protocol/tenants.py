"""Tenants and how they prove who they are: SMTP credentials and bound client networks.

Each action is audited; the caller owns the commit, so the change and its audit entry land
together or not at all.
"""

from __future__ import annotations

import ipaddress
import re

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
from runbooks.loader import TEMPLATE_DIR


def get_tenant(session: Session, name: str) -> Tenant:
    tenant = session.exec(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        raise ServiceError(f"tenant {name!r} does not exist")
    return tenant


def add_tenant(
    session: Session, name: str, language: str = "it", contact: str | None = None
) -> Tenant:
    if not NAME.match(name):
        raise ServiceError(f"tenant name {name!r} must be lowercase letters, digits and '-'")
    language = check_language(language)
    contact = check_contact(contact) if contact is not None else None
    if session.exec(select(Tenant).where(Tenant.name == name)).first():
        raise ServiceError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, language=language, contact_email=contact)
    session.add(tenant)
    session.flush()
    record(
        session,
        actor="cli",
        action="tenant.add",
        subject=f"tenant:{name}",
        evidence={"language": language, "contact": contact},
    )
    return tenant


def set_tenant(
    session: Session,
    name: str,
    *,
    contact: str | None = None,
    clear_contact: bool = False,
    language: str | None = None,
) -> Tenant:
    """Change where the tenant's notices go and their language; audited with old and new."""
    tenant = get_tenant(session, name)
    if contact is not None and clear_contact:
        raise ServiceError("give a contact address or clear it, not both")
    changes: dict[str, list[str | None]] = {}
    if contact is not None or clear_contact:
        new = check_contact(contact) if contact is not None else None
        if new != tenant.contact_email:
            changes["contact"] = [tenant.contact_email, new]
            tenant.contact_email = new
    if language is not None:
        new_language = check_language(language)
        if new_language != tenant.language:
            changes["language"] = [tenant.language, new_language]
            tenant.language = new_language
    if not changes:
        raise ServiceError(f"tenant {name!r}: nothing to change")
    session.add(tenant)
    record(session, actor="cli", action="tenant.set", subject=f"tenant:{name}", evidence=changes)
    return tenant


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.exec(select(Tenant).order_by(col(Tenant.name))).all())


def template_languages() -> tuple[str, ...]:
    """The languages customer texts exist in: runbooks/templates/<language>/."""
    return tuple(sorted(p.name for p in TEMPLATE_DIR.iterdir() if p.is_dir()))


def check_language(language: str) -> str:
    languages = template_languages()
    if language not in languages:
        raise ServiceError(
            f"language {language!r} has no templates; choose one of {', '.join(languages)}"
        )
    return language


# RFC 5322 dot-atom text (the local part as people write it; quoted local parts are refused)
# and an RFC 1035 host name of at least two labels whose top label is not numeric.
_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def check_contact(address: str) -> str:
    """A contact address, checked for what a mail system needs; returned with its domain in
    lower case (and an internationalised domain in its ASCII form). Refusals name the value."""
    bad = f"contact address {address!r} is not valid"
    text = address.strip()
    if not text:
        raise ServiceError(f"{bad}: it is empty")
    if any(c.isspace() or c in '<>(),;:"[]\\' or ord(c) < 32 for c in text):
        raise ServiceError(f"{bad}: give one bare address like name@example.com")
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise ServiceError(f"{bad}: it needs a local part, '@' and a domain")
    if "@" in local:
        raise ServiceError(f"{bad}: it has more than one '@'")
    if len(local) > 64 or not _ATEXT.match(local):
        raise ServiceError(f"{bad}: the part before '@' ({local!r}) is not a valid mailbox name")
    try:
        domain = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ServiceError(f"{bad}: the domain is not a valid host name") from None
    labels = domain.split(".")
    if (
        len(domain) > 253
        or len(labels) < 2
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ServiceError(f"{bad}: the domain {domain!r} is not a valid host name")
    result = f"{local}@{domain}"
    if len(result) > 254:
        raise ServiceError(f"{bad}: longer than 254 characters")
    return result


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
