"""Where mail leaves from: IP pools, their source addresses, and which pool each stream uses."""

from __future__ import annotations

import ipaddress

from sqlmodel import Session, select

from models import (
    IpAddress,
    IpPool,
    IpState,
    PoolKind,
    Stream,
)
from models.audit_trail import record
from protocol.errors import DOMAIN_NAME, NAME, ServiceError
from protocol.tenants import get_tenant
from relay.delivery.egress import DEFAULT_POOL


def add_pool(session: Session, name: str, kind: str) -> IpPool:
    if not NAME.match(name):
        raise ServiceError(f"pool name {name!r} must be lowercase letters, digits and '-'")
    if kind not in ("dedicated", "shared"):
        raise ServiceError(f"pool kind {kind!r} must be 'dedicated' or 'shared'")
    if session.exec(select(IpPool).where(IpPool.name == name)).first():
        raise ServiceError(f"pool {name!r} already exists")
    pool = IpPool(name=name, kind=PoolKind(kind))
    session.add(pool)
    session.flush()
    record(session, actor="cli", action="pool.add", subject=f"pool:{name}", evidence={"kind": kind})
    return pool


def get_pool(session: Session, name: str) -> IpPool:
    pool = session.exec(select(IpPool).where(IpPool.name == name)).first()
    if pool is None:
        raise ServiceError(f"pool {name!r} does not exist")
    return pool


def add_ip(
    session: Session, address: str, pool_name: str, ptr: str | None, weight: int
) -> IpAddress:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ServiceError(f"address {address!r} is not a valid IPv4 or IPv6 address") from None
    if weight < 0:
        raise ServiceError(f"weight {weight} must be 0 or more")
    if ptr is not None and not DOMAIN_NAME.match(ptr.lower().rstrip(".")):
        raise ServiceError(f"PTR name {ptr!r} is not a valid host name")
    pool = get_pool(session, pool_name)
    if session.exec(select(IpAddress).where(IpAddress.address == str(parsed))).first():
        raise ServiceError(f"address {parsed} is already in a pool")
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
    if not NAME.match(stream):
        raise ServiceError(f"stream name {stream!r} must be lowercase letters, digits and '-'")
    pool = get_pool(session, pool_name)
    fallback_pool = get_pool(session, fallback) if fallback else None
    if fallback_pool is not None and fallback_pool.id == pool.id:
        raise ServiceError(f"fallback pool {fallback!r} is the stream's own pool")
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
