"""Which source IP a message leaves from: the stream's pool, minus what must not send now.

An IP is a candidate for a provider when its state allows sending, no active suspension
covers its (IP, provider) path and its warm-up cap for that provider today is not reached.
Among candidates the pool's weights decide. When none is left the stream's fallback pool is
tried, else the mail waits. The relay only reads this state; the Protocol writes it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, case, select, update

from config.clock import Clock
from models import (
    HoldReason,
    IpAddress,
    IpPool,
    IpState,
    Stream,
    Suspension,
    WarmupDay,
    WarmupPlan,
)
from models.egress import HOLD_POOL

DEFAULT_POOL = "default"
SENDING_STATES = {IpState.cold, IpState.warming, IpState.active}
ALL_PROVIDERS = "*"


@dataclass(frozen=True)
class SourceIp:
    address: str
    ptr_name: str | None
    pool: str


@dataclass(frozen=True)
class EgressChoice:
    source: SourceIp | None
    warmup_day_id: int | None = None
    # When source is None: why (as text for the queue, as a reason for the hold tally), and
    # when to look again.
    wait_reason: str = ""
    wait_until: datetime | None = None
    hold: HoldReason = HoldReason.no_ip


@dataclass
class _Ip:
    id: int
    address: str
    ptr_name: str | None
    weight: int
    state: IpState


@dataclass
class _Snapshot:
    loaded_at: float
    pools: dict[int, str] = field(default_factory=dict)
    pool_ids: dict[str, int] = field(default_factory=dict)
    ips: dict[int, list[_Ip]] = field(default_factory=lambda: defaultdict(list))
    streams: dict[tuple[int, str], tuple[int, int | None]] = field(default_factory=dict)
    suspended: dict[tuple[str, str], datetime] = field(default_factory=dict)  # (ip, provider)
    throttles: dict[tuple[str, str], int] = field(default_factory=dict)  # per minute
    caps: dict[tuple[int, str], tuple[int, int, int]] = field(
        default_factory=dict
    )  # day, cap, sent


class _NeedsDatabase(Exception):
    """choose_cached() reached a step that needs the database."""


class Egress:
    def __init__(
        self, engine: Engine, clock: Clock, ttl: float = 2.0, rng: random.Random | None = None
    ):
        self._engine = engine
        self._clock = clock
        self._ttl = ttl
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._snapshot: _Snapshot | None = None
        self._inline = False  # inside choose_cached(): no database access allowed

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def throttle_for(self, ip: str, provider: str) -> int | None:
        snap = self._current()
        return snap.throttles.get((ip, provider)) or snap.throttles.get((ip, ALL_PROVIDERS))

    def release(self, warmup_day_id: int | None, delivered: int) -> None:
        """A warm-up pick is over. choose() counted it as one in WarmupDay.sent; make that what
        was delivered (0 gives the unit back; a message to several recipients counts each).
        Blocking (a database write): call it from a thread."""
        if warmup_day_id is None or delivered == 1:
            return
        change = delivered - 1
        sent = WarmupDay.sent + change
        if change < 0:
            sent = case((WarmupDay.sent + change < 0, 0), else_=WarmupDay.sent + change)
        with self._engine.begin() as conn:
            conn.execute(update(WarmupDay).where(WarmupDay.id == warmup_day_id).values(sent=sent))
        with self._lock:  # until the next reload reads the new count
            self._set_sent(self._snapshot, warmup_day_id, lambda cap, old: max(0, old + change))

    def _reserve(self, snap: _Snapshot, day_id: int) -> bool:
        """One unit of today's cap, taken in the database where every node sees it at once:
        the row decides, not this node's snapshot, or each relay node would fill the cap."""
        if self._inline:
            raise _NeedsDatabase
        with self._engine.begin() as conn:
            row = conn.execute(
                update(WarmupDay)
                .where(WarmupDay.id == day_id, WarmupDay.sent < WarmupDay.cap)
                .values(sent=WarmupDay.sent + 1)
                .returning(WarmupDay.sent)
            ).first()
        self._set_sent(snap, day_id, lambda cap, old: cap if row is None else row.sent)
        return row is not None

    @staticmethod
    def _set_sent(snap: _Snapshot | None, day_id: int, new) -> None:
        if snap is None:
            return
        for key, (day, cap, sent) in snap.caps.items():
            if day == day_id:
                snap.caps[key] = (day, cap, new(cap, sent))

    def choose(self, tenant_id: int, stream: str, provider: str) -> EgressChoice:
        with self._lock:  # check and count a warm-up pick together (choose runs in threads)
            return self._choose(tenant_id, stream, provider)

    def choose_cached(self, tenant_id: int, stream: str, provider: str) -> EgressChoice | None:
        """choose() when it needs no database: the snapshot is fresh and the pick reserves no
        warm-up cap. Else None, and the caller runs choose() in a thread. Microseconds, so
        the delivery engine asks here first instead of paying a thread hop per message."""
        with self._lock:
            snap = self._snapshot
            if snap is None or time.monotonic() - snap.loaded_at >= self._ttl:
                return None
            self._inline = True
            try:
                return self._choose(tenant_id, stream, provider)
            except _NeedsDatabase:
                return None
            finally:
                self._inline = False

    def _choose(self, tenant_id: int, stream: str, provider: str) -> EgressChoice:
        snap = self._current()
        pool_id, fallback_id = snap.streams.get(
            (tenant_id, stream), (snap.pool_ids.get(DEFAULT_POOL), None)
        )
        if pool_id is None:
            return EgressChoice(
                None,
                wait_reason=f"stream {stream!r} has no pool and no default pool exists",
                wait_until=self._clock.now() + timedelta(minutes=5),
            )
        reasons: list[str] = []
        waits: list[datetime] = []
        holds: set[HoldReason] = set()
        for candidate_pool in (pool_id, fallback_id):
            if candidate_pool is None:
                continue
            choice = self._choose_in(snap, candidate_pool, provider, reasons, waits, holds)
            if choice is not None:
                return choice
        return EgressChoice(
            None,
            wait_reason="; ".join(reasons) or "no usable source IP",
            wait_until=min(waits) if waits else None,
            hold=_dominant(holds),
        )

    def _choose_in(
        self,
        snap: _Snapshot,
        pool_id: int,
        provider: str,
        reasons: list[str],
        waits: list[datetime],
        holds: set[HoldReason],
    ):
        pool = snap.pools[pool_id]
        candidates: list[tuple[_Ip, int | None]] = []
        for ip in snap.ips.get(pool_id, []):
            if ip.state not in SENDING_STATES or ip.weight <= 0:
                continue
            suspended = snap.suspended.get((ip.address, provider)) or snap.suspended.get(
                (ip.address, ALL_PROVIDERS)
            )
            if suspended is not None:
                reasons.append(f"{ip.address} suspended for {provider} until {suspended:%H:%M:%S}Z")
                waits.append(suspended)
                holds.add(HoldReason.suspended)
                continue
            cap = snap.caps.get((ip.id, provider)) or snap.caps.get((ip.id, ALL_PROVIDERS))
            if cap is not None:
                day_id, limit, sent = cap
                if sent >= limit:
                    reasons.append(
                        f"{ip.address} reached its warm-up cap of {limit} for {provider} today"
                    )
                    holds.add(HoldReason.capped)
                    continue
                candidates.append((ip, day_id))
            else:
                candidates.append((ip, None))
        if not candidates:
            if not snap.ips.get(pool_id):
                reasons.append(f"pool {pool} has no IP addresses")
                holds.add(HoldReason.held if pool == HOLD_POOL else HoldReason.no_ip)
            return None
        while candidates:
            pick = self._rng.choices(candidates, weights=[c[0].weight for c in candidates])[0]
            ip, day_id = pick
            if day_id is None or self._reserve(snap, day_id):
                return EgressChoice(SourceIp(ip.address, ip.ptr_name, pool), warmup_day_id=day_id)
            candidates.remove(pick)  # other nodes used the rest of today's cap
            reasons.append(f"{ip.address} reached its warm-up cap for {provider} today")
            holds.add(HoldReason.capped)
        return None

    def _current(self) -> _Snapshot:
        with self._lock:
            snap = self._snapshot
            if snap is not None and time.monotonic() - snap.loaded_at < self._ttl:
                return snap
            snap = self._load()
            self._snapshot = snap
            return snap

    def _load(self) -> _Snapshot:
        now = self._clock.now()
        snap = _Snapshot(loaded_at=time.monotonic())
        with self._engine.connect() as conn:
            for pid, name in conn.execute(select(IpPool.id, IpPool.name)):
                snap.pools[pid] = name
                snap.pool_ids[name] = pid
            for row in conn.execute(
                select(
                    IpAddress.id,
                    IpAddress.pool_id,
                    IpAddress.address,
                    IpAddress.ptr_name,
                    IpAddress.weight,
                    IpAddress.state,
                )
            ):
                snap.ips[row.pool_id].append(
                    _Ip(row.id, row.address, row.ptr_name, row.weight, row.state)
                )
            for row in conn.execute(
                select(Stream.tenant_id, Stream.name, Stream.pool_id, Stream.fallback_pool_id)
            ):
                snap.streams[(row.tenant_id, row.name)] = (row.pool_id, row.fallback_pool_id)
            for row in conn.execute(
                select(
                    Suspension.source_ip,
                    Suspension.provider,
                    Suspension.action,
                    Suspension.limit_per_minute,
                    Suspension.expires_at,
                ).where(Suspension.expires_at > now)
            ):
                key = (row.source_ip, row.provider)
                expires = _utc(row.expires_at)
                if row.action == "suspend":
                    snap.suspended[key] = max(expires, snap.suspended.get(key, expires))
                elif row.limit_per_minute:
                    snap.throttles[key] = min(
                        row.limit_per_minute, snap.throttles.get(key, row.limit_per_minute)
                    )
            for row in conn.execute(
                select(
                    WarmupDay.id,
                    WarmupPlan.ip_id,
                    WarmupDay.provider,
                    WarmupDay.cap,
                    WarmupDay.sent,
                )
                .join(WarmupPlan, WarmupPlan.id == WarmupDay.plan_id)
                .where(WarmupPlan.state == "running", WarmupDay.day == now.date())
            ):
                snap.caps[(row.ip_id, row.provider)] = (row.id, row.cap, row.sent)
        return snap


# When the IPs of a stream's pools wait for different reasons, the tally names one: a hold or
# a suspension (a decision about the sender) before a cap (a plan working as intended).
_HOLD_ORDER = (HoldReason.held, HoldReason.suspended, HoldReason.capped)


def _dominant(holds: set[HoldReason]) -> HoldReason:
    return next((h for h in _HOLD_ORDER if h in holds), HoldReason.no_ip)


def _utc(moment: datetime) -> datetime:
    from models.audit import as_utc

    return as_utc(moment)
