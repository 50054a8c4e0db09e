"""Where mail leaves from: IP pools, their source addresses, and which pool each stream uses."""

from __future__ import annotations

import ipaddress

from sqlmodel import Session, col, select

from models import (
    AuditEntry,
    IpAddress,
    IpPool,
    IpState,
    PoolKind,
    Stream,
)
from models.audit_trail import record
from models.egress import HOLD_POOL
from protocol.errors import DOMAIN_NAME, NAME, ServiceError
from protocol.tenants import get_tenant, queued_recipients
from protocol.verbs import Act, of_pool, of_stream, wake
from relay.delivery.egress import DEFAULT_POOL, SENDING_STATES

# The empty pool the suspend-stream runbook binds a stream to (flows/suspend_stream.py).


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


def _latest_entry(session: Session, action: str, subject: str) -> AuditEntry | None:
    return session.exec(
        select(AuditEntry)
        .where(AuditEntry.action == action, AuditEntry.subject == subject)
        .order_by(col(AuditEntry.id).desc())
        .limit(1)
    ).first()


def release_stream(
    session: Session, tenant_name: str, stream: str, act: Act, pool_name: str | None = None
) -> tuple[Stream, str, str | None, int]:
    """Bind a held stream back to a pool and wake its waiting mail: to pool_name when given,
    else to the pool (and overflow pool) the hold's audit entry says it left. Returns the
    stream, its pool, its overflow pool and how many recipients woke."""
    tenant = get_tenant(session, tenant_name)
    subject = f"stream:{tenant_name}/{stream}"
    row = session.exec(
        select(Stream).where(Stream.tenant_id == tenant.id, Stream.name == stream)
    ).first()
    hold = session.exec(select(IpPool).where(IpPool.name == HOLD_POOL)).first()
    if row is None or hold is None or row.pool_id != hold.id:
        raise ServiceError(f"{tenant_name}/{stream} is not held (not bound to pool {HOLD_POOL})")
    held_by = _latest_entry(session, "stream.suspend", subject)
    fallback_name: str | None = None
    if pool_name is None:
        if held_by is None or not held_by.evidence.get("previous_pool"):
            raise ServiceError(
                f"no audit entry of the hold of {tenant_name}/{stream} names the pool it left; "
                "say which with --pool"
            )
        pool_name = held_by.evidence["previous_pool"]
        fallback_name = held_by.evidence.get("previous_fallback_pool")
        source = f"audit entry {held_by.id} (stream.suspend)"
    else:
        source = "--pool"
    if pool_name == HOLD_POOL:
        raise ServiceError(f"releasing to pool {HOLD_POOL} would keep the stream held")
    pool = get_pool(session, pool_name)
    fallback = None
    if fallback_name and fallback_name not in (HOLD_POOL, pool_name):
        fallback = session.exec(select(IpPool).where(IpPool.name == fallback_name)).first()
    row.pool_id = pool.id
    row.fallback_pool_id = fallback.id if fallback else None
    session.add(row)
    session.flush()
    woken = wake(session, act.now, messages=of_stream(tenant.id, stream))
    act.audit(
        session,
        "stream.release",
        subject,
        {
            "pool": pool.name,
            "fallback_pool": fallback.name if fallback else None,
            "pool_from": source,
            "held_by_audit_id": held_by.id if held_by else None,
            "queued_recipients": queued_recipients(session, tenant.id, stream),
            "woken": woken,
        },
    )
    return row, pool.name, fallback.name if fallback else None, woken


def get_ip(session: Session, address: str) -> IpAddress:
    try:
        text = str(ipaddress.ip_address(address))
    except ValueError:
        raise ServiceError(f"address {address!r} is not a valid IPv4 or IPv6 address") from None
    ip = session.exec(select(IpAddress).where(IpAddress.address == text)).first()
    if ip is None:
        raise ServiceError(f"address {text} is not in any pool")
    return ip


def retire_ip(session: Session, address: str, act: Act) -> IpAddress:
    """The address stops sending (state retired); its previous state goes into the audit entry,
    which is where reinstate_ip reads it back."""
    ip = get_ip(session, address)
    if ip.state == IpState.retired:
        raise ServiceError(f"{ip.address} is already retired")
    previous = IpState(ip.state)
    others = session.exec(
        select(IpAddress).where(
            IpAddress.pool_id == ip.pool_id,
            IpAddress.id != ip.id,
            col(IpAddress.state).in_([str(s) for s in SENDING_STATES]),
        )
    ).all()
    ip.state = IpState.retired
    session.add(ip)
    pool = session.get(IpPool, ip.pool_id)
    act.audit(
        session,
        "ip.retire",
        f"ip:{ip.address}",
        {
            "from_state": str(previous),
            "pool": pool.name if pool else None,
            # None left: the pool's streams wait (or overflow) until an address sends again.
            "pool_sending_addresses_left": [o.address for o in others],
        },
    )
    return ip


def reinstate_ip(session: Session, address: str, act: Act) -> tuple[IpAddress, int]:
    """Return a retired address to the state it had before its retirement, read from that
    audit entry; cold when no entry says (it warms up again rather than send at full rate).
    Wakes the waiting mail of the streams that send from its pool."""
    ip = get_ip(session, address)
    if ip.state != IpState.retired:
        raise ServiceError(f"{ip.address} is not retired (state {ip.state})")
    retired_by = _latest_entry(session, "ip.retire", f"ip:{ip.address}")
    recorded = retired_by.evidence.get("from_state") if retired_by else None
    state = IpState(recorded) if recorded in IpState.__members__ else IpState.cold
    if state == IpState.retired:
        state = IpState.cold
    ip.state = state
    session.add(ip)
    session.flush()
    default = session.exec(select(IpPool).where(IpPool.name == DEFAULT_POOL)).first()
    woken = 0
    if state in SENDING_STATES:
        woken = wake(
            session, act.now, messages=of_pool(ip.pool_id, default.id if default else None)
        )
    act.audit(
        session,
        "ip.reinstate",
        f"ip:{ip.address}",
        {
            "to_state": str(state),
            "state_from": f"audit entry {retired_by.id} (ip.retire)"
            if recorded
            else "no record of its previous state: cold, to warm up again",
            "woken": woken,
        },
    )
    return ip, woken


def stream_binding(session: Session, tenant_name: str, stream: str) -> dict:
    """The stream as the relay sees it now: its pool and overflow pool (a stream without a row
    uses the default pool) and how many of its recipients wait in the queue."""
    tenant = get_tenant(session, tenant_name)
    row = session.exec(
        select(Stream).where(Stream.tenant_id == tenant.id, Stream.name == stream)
    ).first()
    return {
        "tenant": tenant_name,
        "stream": stream,
        "pool": _pool_name(session, row.pool_id) if row else DEFAULT_POOL,
        "fallback_pool": _pool_name(session, row.fallback_pool_id) if row else None,
        "queued_recipients": queued_recipients(session, tenant.id, stream),
    }


def hold_stream(
    session: Session,
    tenant_name: str,
    stream: str,
    act: Act,
    runbook: tuple[str, str],
) -> dict:
    """Hold a stream's outgoing mail: bind it to the empty pool `hold` (no overflow), so egress
    finds no source IP and its mail waits in the spool; submission goes on. Audited as
    stream.suspend with the pools it left, which `release_stream` reads back. `runbook`: the
    (id, version) of the runbook that decided it (suspend-stream, degradation-triage)."""
    before = stream_binding(session, tenant_name, stream)
    if before["pool"] == HOLD_POOL:
        raise ServiceError(f"{tenant_name}/{stream} is already held (pool {HOLD_POOL})")
    hold = _hold_pool(session, act.actor, runbook)
    tenant = get_tenant(session, tenant_name)
    row = session.exec(
        select(Stream).where(Stream.tenant_id == tenant.id, Stream.name == stream)
    ).first() or Stream(tenant_id=tenant.id, name=stream, pool_id=hold.id)
    row.pool_id, row.fallback_pool_id = hold.id, None  # no overflow either
    session.add(row)
    record(
        session,
        actor=act.actor,
        action="stream.suspend",
        subject=f"stream:{tenant_name}/{stream}",
        evidence={
            "reason": act.reason,
            **act.evidence,
            "previous_pool": before["pool"],
            "previous_fallback_pool": before["fallback_pool"],
            "queued_recipients": before["queued_recipients"],
        },
        runbook_id=runbook[0],
        runbook_version=runbook[1],
        at=act.now,
    )
    release = f"axiom stream release {tenant_name} {stream} --as NAME --reason TEXT"
    return {"held": f"{tenant_name}/{stream}", **before, "release_with": release}


def move_stream(
    session: Session, tenant_name: str, stream: str, act: Act, pool_name: str | None = None
) -> dict:
    """Bind a stream to another pool: `pool_name`, or its overflow pool when none is named
    (the triage runbook's "move it to another pool": its mail stops sharing the pool whose
    reputation it harms, or stops harming the pool's other tenants). The new binding has no
    overflow pool, so the stream cannot spill back; waiting mail is woken. Audited as
    stream.move with the binding it left (`axiom stream set` restores it)."""
    before = stream_binding(session, tenant_name, stream)
    if before["pool"] == HOLD_POOL:
        raise ServiceError(f"{tenant_name}/{stream} is held; release it instead of moving it")
    target = pool_name or before["fallback_pool"]
    if target is None:
        raise ServiceError(
            f"{tenant_name}/{stream} has no overflow pool to move to; name one with --pool"
        )
    if target in (HOLD_POOL, before["pool"]):
        raise ServiceError(f"{tenant_name}/{stream} cannot move to pool {target!r}")
    pool = get_pool(session, target)
    has_ip = session.exec(
        select(IpAddress.id).where(
            IpAddress.pool_id == pool.id, col(IpAddress.state).in_(SENDING_STATES)
        )
    ).first()
    if has_ip is None:
        raise ServiceError(f"pool {target!r} has no address that sends; moving would hold the mail")
    tenant = get_tenant(session, tenant_name)
    row = session.exec(
        select(Stream).where(Stream.tenant_id == tenant.id, Stream.name == stream)
    ).first() or Stream(tenant_id=tenant.id, name=stream, pool_id=pool.id)
    row.pool_id, row.fallback_pool_id = pool.id, None
    session.add(row)
    session.flush()
    woken = wake(session, act.now, messages=of_stream(tenant.id, stream))
    act.audit(
        session,
        "stream.move",
        f"stream:{tenant_name}/{stream}",
        {
            "pool": pool.name,
            "previous_pool": before["pool"],
            "previous_fallback_pool": before["fallback_pool"],
            "queued_recipients": before["queued_recipients"],
            "woken": woken,
        },
    )
    back = f"axiom stream set {tenant_name} {stream} --pool {before['pool']}" + (
        f" --fallback {before['fallback_pool']}" if before["fallback_pool"] else ""
    )
    return {"moved": f"{tenant_name}/{stream}", **before, "to_pool": pool.name, "back_with": back}


def _pool_name(session: Session, pool_id: int | None) -> str | None:
    if pool_id is None:
        return None
    pool = session.get(IpPool, pool_id)
    return pool.name if pool else None


def _hold_pool(session: Session, actor: str, runbook: tuple[str, str]) -> IpPool:
    pool = session.exec(select(IpPool).where(IpPool.name == HOLD_POOL)).first()
    if pool is None:
        pool = IpPool(name=HOLD_POOL, kind=PoolKind.shared)
        session.add(pool)
        session.flush()
        record(
            session,
            actor=actor,
            action="pool.add",
            subject=f"pool:{HOLD_POOL}",
            evidence={"kind": "shared", "purpose": "holds suspended streams; must stay empty"},
            runbook_id=runbook[0],
            runbook_version=runbook[1],
        )
    has_addresses = session.exec(select(IpAddress).where(IpAddress.pool_id == pool.id)).first()
    if has_addresses is not None:
        raise ServiceError(
            f"pool {HOLD_POOL!r} has addresses ({has_addresses.address}); it cannot hold mail. "
            "Move them to another pool first."
        )
    return pool
