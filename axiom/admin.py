"""Operator actions behind the CLI: tenants, credentials, domains. Each one is audited.

Functions take an open session and leave the commit to the caller, so a CLI command (or a
flow step, later) commits the change and its audit entry together or not at all.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import Session, select

from models import (
    ClientNetwork,
    Credential,
    DkimKey,
    Domain,
    DomainState,
    IpAddress,
    IpPool,
    IpState,
    KeyState,
    PoolKind,
    Stream,
    Tenant,
)
from models.audit_trail import record
from relay.auth import generate_password, hash_password
from relay.dkim import generate_key, selector_for, txt_record_value
from relay.egress import DEFAULT_POOL
from relay.keystore import KeyBox
from runbooks.loader import dkim_signing

_TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DOMAIN_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


class AdminError(Exception):
    """A refused operator action; the message names the bad value."""


def _operator_actor(operator: str | None) -> str:
    return f"operator:{operator}" if operator else "cli"


def get_tenant(session: Session, name: str) -> Tenant:
    tenant = session.exec(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        raise AdminError(f"tenant {name!r} does not exist")
    return tenant


def get_domain(session: Session, name: str) -> Domain:
    domain = session.exec(select(Domain).where(Domain.name == name.lower())).first()
    if domain is None:
        raise AdminError(f"domain {name!r} does not exist")
    return domain


def add_tenant(session: Session, name: str, language: str = "it") -> Tenant:
    if not _TENANT_NAME.match(name):
        raise AdminError(f"tenant name {name!r} must be lowercase letters, digits and '-'")
    if language not in ("it", "en"):
        raise AdminError(f"language {language!r} must be 'it' or 'en'")
    if session.exec(select(Tenant).where(Tenant.name == name)).first():
        raise AdminError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name, language=language)
    session.add(tenant)
    session.flush()
    record(session, actor="cli", action="tenant.add", subject=f"tenant:{name}")
    return tenant


def add_credential(session: Session, tenant_name: str, username: str) -> str:
    """Creates the credential and returns its password, which is stored only as a hash."""
    tenant = get_tenant(session, tenant_name)
    if not username or len(username) > 128 or any(c.isspace() for c in username):
        raise AdminError(f"username {username!r} must be 1-128 characters without spaces")
    if session.exec(select(Credential).where(Credential.username == username)).first():
        raise AdminError(f"username {username!r} already exists")
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
        raise AdminError(f"CIDR {cidr!r} is not a valid IPv4 or IPv6 network") from None
    if network.prefixlen == 0:
        raise AdminError(f"CIDR {cidr!r} would bind every address; refused")
    text = str(network)
    if session.exec(select(ClientNetwork).where(ClientNetwork.cidr == text)).first():
        raise AdminError(f"network {text} is already bound to a tenant")
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


@dataclass(frozen=True)
class DnsRecord:
    name: str
    type: str
    value: str
    purpose: str


def add_domain(session: Session, keybox: KeyBox, tenant_name: str, domain_name: str) -> Domain:
    tenant = get_tenant(session, tenant_name)
    name = domain_name.lower().rstrip(".")
    if not _DOMAIN_NAME.match(name):
        raise AdminError(f"domain {domain_name!r} is not a valid domain name")
    if session.exec(select(Domain).where(Domain.name == name)).first():
        raise AdminError(f"domain {name!r} already exists")
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
    if not operator.strip():
        raise AdminError("--as must name the operator")
    if not reason.strip():
        raise AdminError("--reason must say why the domain is activated by hand")
    domain = get_domain(session, domain_name)
    if domain.state == DomainState.active:
        raise AdminError(f"domain {domain.name!r} is already active")
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
        actor=_operator_actor(operator),
        action="domain.activate",
        subject=f"domain:{domain.name}",
        evidence={
            "reason": reason,
            "from_state": str(previous),
            "manual": True,
            "keys": [k.selector for k in keys],
        },
    )
    return domain


# ---------------------------------------------------------------- egress: pools, IPs, streams
def add_pool(session: Session, name: str, kind: str) -> IpPool:
    if not _TENANT_NAME.match(name):
        raise AdminError(f"pool name {name!r} must be lowercase letters, digits and '-'")
    if kind not in ("dedicated", "shared"):
        raise AdminError(f"pool kind {kind!r} must be 'dedicated' or 'shared'")
    if session.exec(select(IpPool).where(IpPool.name == name)).first():
        raise AdminError(f"pool {name!r} already exists")
    pool = IpPool(name=name, kind=PoolKind(kind))
    session.add(pool)
    session.flush()
    record(session, actor="cli", action="pool.add", subject=f"pool:{name}", evidence={"kind": kind})
    return pool


def get_pool(session: Session, name: str) -> IpPool:
    pool = session.exec(select(IpPool).where(IpPool.name == name)).first()
    if pool is None:
        raise AdminError(f"pool {name!r} does not exist")
    return pool


def add_ip(
    session: Session, address: str, pool_name: str, ptr: str | None, weight: int
) -> IpAddress:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise AdminError(f"address {address!r} is not a valid IPv4 or IPv6 address") from None
    if weight < 0:
        raise AdminError(f"weight {weight} must be 0 or more")
    if ptr is not None and not _DOMAIN_NAME.match(ptr.lower().rstrip(".")):
        raise AdminError(f"PTR name {ptr!r} is not a valid host name")
    pool = get_pool(session, pool_name)
    if session.exec(select(IpAddress).where(IpAddress.address == str(parsed))).first():
        raise AdminError(f"address {parsed} is already in a pool")
    ip = IpAddress(
        address=str(parsed),
        pool_id=pool.id,
        ptr_name=ptr.lower().rstrip(".") if ptr else None,
        weight=weight,
    )
    session.add(ip)
    session.flush()
    record(
        session,
        actor="cli",
        action="ip.add",
        subject=f"ip:{parsed}",
        evidence={"pool": pool_name, "ptr": ip.ptr_name, "weight": weight, "state": "cold"},
    )
    return ip


def set_stream(
    session: Session, tenant_name: str, stream: str, pool_name: str, fallback: str | None
) -> Stream:
    tenant = get_tenant(session, tenant_name)
    if not _TENANT_NAME.match(stream):
        raise AdminError(f"stream name {stream!r} must be lowercase letters, digits and '-'")
    pool = get_pool(session, pool_name)
    fallback_pool = get_pool(session, fallback) if fallback else None
    if fallback_pool is not None and fallback_pool.id == pool.id:
        raise AdminError(f"fallback pool {fallback!r} is the stream's own pool")
    row = session.exec(
        select(Stream).where(Stream.tenant_id == tenant.id, Stream.name == stream)
    ).first()
    before = None
    if row is None:
        row = Stream(tenant_id=tenant.id, name=stream, pool_id=pool.id)
    else:
        before = {"pool_id": row.pool_id, "fallback_pool_id": row.fallback_pool_id}
    row.pool_id = pool.id
    row.fallback_pool_id = fallback_pool.id if fallback_pool else None
    session.add(row)
    record(
        session,
        actor="cli",
        action="stream.set",
        subject=f"stream:{tenant_name}/{stream}",
        evidence={"pool": pool_name, "fallback": fallback, "before": before},
    )
    return row


def ensure_default_pool(session: Session) -> bool:
    """A fresh install delivers out of the box: pool 'default' (shared) holding 127.0.0.1."""
    if session.exec(select(IpPool).where(IpPool.name == DEFAULT_POOL)).first():
        return False
    pool = IpPool(name=DEFAULT_POOL, kind=PoolKind.shared)
    session.add(pool)
    session.flush()
    session.add(IpAddress(address="127.0.0.1", pool_id=pool.id, state=IpState.active))
    record(
        session,
        actor="cli",
        action="pool.add",
        subject=f"pool:{DEFAULT_POOL}",
        evidence={"kind": "shared", "addresses": ["127.0.0.1"], "default": True},
    )
    return True


# ---------------------------------------------------------------- operators (checkpoints)
_OPERATOR_NAME = re.compile(r"^[a-z][a-z0-9._-]{1,63}$")
_SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,31}$")


def add_operator(session: Session, name: str, roles: list[str], slack_id: str | None):
    """A person who may answer checkpoints of the kinds their roles allow (deny by default)."""
    from models import Operator
    from runbooks.loader import checkpoints

    if not _OPERATOR_NAME.match(name):
        raise AdminError(f"operator name {name!r} must be lowercase letters, digits, '.', '_', '-'")
    declared = checkpoints().spec.role_names
    unknown = sorted(set(roles) - declared)
    if unknown:
        raise AdminError(
            f"role(s) {', '.join(unknown)} not declared in runbooks/checkpoints.yaml "
            f"(declared: {', '.join(sorted(declared))})"
        )
    if slack_id is not None and not _SLACK_USER_ID.match(slack_id):
        raise AdminError(f"Slack user id {slack_id!r} must look like U0123ABCD")
    if session.exec(select(Operator).where(Operator.name == name)).first():
        raise AdminError(f"operator {name!r} already exists")
    if slack_id is not None:
        holder = session.exec(select(Operator).where(Operator.slack_user_id == slack_id)).first()
        if holder is not None:
            raise AdminError(f"Slack user {slack_id} already belongs to operator {holder.name}")
    operator = Operator(name=name, roles=",".join(sorted(set(roles))), slack_user_id=slack_id)
    session.add(operator)
    session.flush()
    record(
        session,
        actor="cli",
        action="operator.add",
        subject=f"operator:{name}",
        evidence={"roles": sorted(set(roles)), "slack_user_id": slack_id},
    )
    return operator
