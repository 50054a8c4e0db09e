"""Which source IP a message leaves from: the stream's pool, minus what must not send now.

An IP is a candidate for a provider when its state allows sending, no active suspension
covers its (IP, provider) path and, while it warms up, its warm-up allowance for that provider
is not used: the day's cap as opened so far by the plan's hourly spread. A cold IP with no
plan is no candidate (it would carry a stream's full traffic on no history). Among candidates
the pool's weights decide, with warming IPs first for messages marked as warm-up candidates. When none is left the stream's fallback pool is tried (unless the
caps that stopped the pool belong to plans that say wait), else the mail waits. A new sending
domain's plan caps that domain per provider on every IP.

The relay reads this state and writes one thing: a warm-up day's row when the control plane
has not written it yet (the plan's cap for the day, runbooks/warmup.py), so a missing row
never means no cap.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import Engine, case, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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
from models.db import is_sqlite
from models.domains import Domain
from models.egress import CAPPED_STATES, HOLD_POOL, WarmupState
from runbooks.schema_warmup import IpWarmupSpec, Plan, Spread
from runbooks.warmup import cap_for, opened

log = logging.getLogger("axiom.egress")

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
    warmup_day_id: int | None = None  # the IP's warm-up day a unit was taken from
    domain_day_id: int | None = None  # the From domain's warm-up day a unit was taken from
    # Recipients of the job this source may take: all of them, unless a warm-up cap had fewer
    # units left (the rest wait for the next pick, without an attempt).
    units: int = 1
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


@dataclass(frozen=True)
class _Plan:
    """A WarmupPlan in a capped state, with what the runbook says about its plan."""

    id: int
    state: str
    candidates: str  # "all" | "marked"
    overflow: str  # "fallback" | "wait"
    spread: Spread


@dataclass
class _Cap:
    day_id: int
    cap: int
    sent: int
    plan: _Plan


@dataclass
class _Snapshot:
    loaded_at: float
    pools: dict[int, str] = field(default_factory=dict)
    pool_ids: dict[str, int] = field(default_factory=dict)
    ips: dict[int, list[_Ip]] = field(default_factory=lambda: defaultdict(list))
    streams: dict[tuple[int, str], tuple[int, int | None]] = field(default_factory=dict)
    suspended: dict[tuple[str, str], datetime] = field(default_factory=dict)  # (ip, provider)
    throttles: dict[tuple[str, str], int] = field(default_factory=dict)  # per minute
    # Warm-up: the day the caps are for (None: no plan caps anything), the plan of each capped
    # IP, and today's row per (IP id, provider) and per (From domain, provider).
    day: date | None = None
    ip_plans: dict[int, _Plan] = field(default_factory=dict)
    caps: dict[tuple[int, str], _Cap] = field(default_factory=dict)
    domain_caps: dict[tuple[str, str], _Cap] = field(default_factory=dict)
    rows: dict[int, _Cap] = field(default_factory=dict)  # by WarmupDay id


class _NeedsDatabase(Exception):
    """choose_cached() reached a step that needs the database."""


@dataclass
class _Search:
    """What one choice collected on its way through the pools."""

    provider: str
    candidate: bool
    units: int = 1  # recipients in the job: a pick of a capped path takes one unit each
    now: datetime | None = None
    reasons: list[str] = field(default_factory=list)
    waits: list[datetime] = field(default_factory=list)
    holds: set[HoldReason] = field(default_factory=set)


class Egress:
    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        ttl: float = 2.0,
        rng: random.Random | None = None,
        warmup: IpWarmupSpec | None = None,
    ):
        self._engine = engine
        self._clock = clock
        self._ttl = ttl
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._snapshot: _Snapshot | None = None
        self._inline = False  # inside choose_cached(): no database access allowed
        if warmup is None:
            from runbooks.loader import ip_warmup

            warmup = ip_warmup().spec
        self._warmup = warmup
        self._unknown_plans: set[str] = set()  # logged once per process

    def invalidate(self) -> None:
        with self._lock:
            self._snapshot = None

    def throttle_for(self, ip: str, provider: str) -> int | None:
        snap = self._current()
        return snap.throttles.get((ip, provider)) or snap.throttles.get((ip, ALL_PROVIDERS))

    def release(
        self,
        warmup_day_id: int | None,
        delivered: int,
        domain_day_id: int | None = None,
        units: int = 1,
    ) -> None:
        """A warm-up pick is over. choose() counted it as `units` (its recipients) in
        WarmupDay.sent (the IP's day and the From domain's); make that what was delivered
        (0 gives the units back). Blocking (a database write): call it from a thread."""
        change = delivered - units
        days = [d for d in (warmup_day_id, domain_day_id) if d is not None]
        if not days or change == 0:
            return
        with self._engine.begin() as conn:
            for day_id in days:
                self._add_sent(conn, day_id, change)
        with self._lock:  # until the next reload reads the new count
            for day_id in days:
                self._set_sent(self._snapshot, day_id, lambda cap, old: max(0, old + change))

    @staticmethod
    def _add_sent(conn, day_id: int, change: int) -> None:
        sent = WarmupDay.sent + change
        if change < 0:
            sent = case((WarmupDay.sent + change < 0, 0), else_=WarmupDay.sent + change)
        conn.execute(update(WarmupDay).where(WarmupDay.id == day_id).values(sent=sent))

    def _reserve(self, snap: _Snapshot, cap: _Cap, allowance: int, units: int = 1) -> int:
        """Units of what the day has opened so far, one per recipient of the job, taken in the
        database where every node sees them at once: the row decides, not this node's
        snapshot, or each relay node would fill the allowance. The row's own cap bounds it
        too (the control plane may lower it within the snapshot's lifetime). All the job's
        units when they fit; else what is left (the job sends to that many recipients and
        the rest wait), so a cap fills exactly whatever the size of the messages. Returns the
        units taken (0: none left)."""
        if self._inline:
            raise _NeedsDatabase
        granted = 0
        with self._engine.begin() as conn:
            row = conn.execute(
                update(WarmupDay)
                .where(
                    WarmupDay.id == cap.day_id,
                    WarmupDay.sent + units <= allowance,
                    WarmupDay.sent + units <= WarmupDay.cap,
                )
                .values(sent=WarmupDay.sent + units)
                .returning(WarmupDay.sent)
            ).first()
            if row is not None:
                granted = units
            elif units > 1:
                seen = conn.execute(
                    select(WarmupDay.sent, WarmupDay.cap).where(WarmupDay.id == cap.day_id)
                ).first()
                left = 0 if seen is None else min(allowance, seen.cap) - seen.sent
                if left > 0:  # taken only if no other node moved the row meanwhile
                    row = conn.execute(
                        update(WarmupDay)
                        .where(WarmupDay.id == cap.day_id, WarmupDay.sent == seen.sent)
                        .values(sent=seen.sent + left)
                        .returning(WarmupDay.sent)
                    ).first()
                    granted = left if row is not None else 0
        self._set_sent(
            snap, cap.day_id, lambda c, old: max(old, allowance) if row is None else row.sent
        )
        return granted

    def _give_back(self, snap: _Snapshot, day_id: int, units: int = 1) -> None:
        with self._engine.begin() as conn:
            self._add_sent(conn, day_id, -units)
        self._set_sent(snap, day_id, lambda cap, old: max(0, old - units))

    @staticmethod
    def _set_sent(snap: _Snapshot | None, day_id: int, new) -> None:
        if snap is None:
            return
        cap = snap.rows.get(day_id)
        if cap is not None:
            cap.sent = new(cap.cap, cap.sent)

    def choose(
        self,
        tenant_id: int,
        stream: str,
        provider: str,
        from_domain: str = "",
        candidate: bool = False,
        units: int = 1,
    ) -> EgressChoice:
        """A source IP for a job of `units` recipients (a capped path takes one unit each)."""
        with self._lock:  # check and count a warm-up pick together (choose runs in threads)
            return self._choose(tenant_id, stream, provider, from_domain, candidate, units)

    def choose_cached(
        self,
        tenant_id: int,
        stream: str,
        provider: str,
        from_domain: str = "",
        candidate: bool = False,
        units: int = 1,
    ) -> EgressChoice | None:
        """choose() when it needs no database: the snapshot is fresh and the pick reserves no
        warm-up cap. Else None, and the caller runs choose() in a thread. Microseconds, so
        the delivery engine asks here first instead of paying a thread hop per message."""
        with self._lock:
            snap = self._snapshot
            if snap is None or time.monotonic() - snap.loaded_at >= self._ttl:
                return None
            if snap.day is not None and self._clock.now().date() != snap.day:
                return None  # a new day: its caps are in rows this snapshot has not read
            self._inline = True
            try:
                return self._choose(tenant_id, stream, provider, from_domain, candidate, units)
            except _NeedsDatabase:
                return None
            finally:
                self._inline = False

    def _choose(
        self,
        tenant_id: int,
        stream: str,
        provider: str,
        from_domain: str,
        candidate: bool,
        units: int = 1,
    ) -> EgressChoice:
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
        search = _Search(provider, candidate, max(1, units))
        domain_day_id, domain_units = None, 0
        if snap.domain_caps and from_domain:
            domain = from_domain.lower().rstrip(".")
            cap = snap.domain_caps.get((domain, provider)) or snap.domain_caps.get(
                (domain, ALL_PROVIDERS)
            )
            if cap is not None:
                # The domain's reputation follows it to any pool: when its cap is out the
                # mail waits rather than overflow.
                allowance = self._allowance(cap, search)
                taken = 0
                if not self._used(cap, allowance, f"domain {domain}", search):
                    taken = self._reserve(snap, cap, allowance, search.units)
                if not taken:
                    if not search.reasons:  # other nodes used the rest of what is open
                        search.reasons.append(
                            f"domain {domain} reached its warm-up cap for {provider} today"
                        )
                        search.holds.add(HoldReason.capped)
                    return self._wait(search)
                domain_day_id, domain_units = cap.day_id, taken
                search.units = taken  # an IP takes at most what the domain may send
        for candidate_pool in (pool_id, fallback_id):
            if candidate_pool is None:
                continue
            choice, wait = self._choose_in(snap, candidate_pool, search)
            if choice is not None:
                if domain_day_id is None:
                    return choice
                if choice.units < domain_units:  # the IP took fewer: the rest back
                    self._give_back(snap, domain_day_id, domain_units - choice.units)
                return EgressChoice(
                    choice.source,
                    warmup_day_id=choice.warmup_day_id,
                    domain_day_id=domain_day_id,
                    units=choice.units,
                )
            if wait:  # the plans that stopped the stream's own pool say wait, not fallback
                break
        if domain_day_id is not None:
            self._give_back(snap, domain_day_id, domain_units)
        return self._wait(search)

    @staticmethod
    def _wait(search: _Search) -> EgressChoice:
        return EgressChoice(
            None,
            wait_reason="; ".join(search.reasons) or "no usable source IP",
            wait_until=min(search.waits) if search.waits else None,
            hold=_dominant(search.holds),
        )

    def _choose_in(
        self, snap: _Snapshot, pool_id: int, search: _Search
    ) -> tuple[EgressChoice | None, bool]:
        """A pick in one pool, and (when there is none) whether every IP it left out was left
        out by the cap of a plan that says wait."""
        pool = snap.pools[pool_id]
        provider = search.provider
        warm: list[tuple[_Ip, _Cap | None, int]] = []
        warming: list[tuple[_Ip, _Cap | None, int]] = []
        waits_only = None  # None: nothing left out yet
        for ip in snap.ips.get(pool_id, []):
            if ip.state not in SENDING_STATES or ip.weight <= 0:
                continue
            suspended = snap.suspended.get((ip.address, provider)) or snap.suspended.get(
                (ip.address, ALL_PROVIDERS)
            )
            if suspended is not None and search.now is None:
                search.now = self._clock.now()
            # A suspension the snapshot still holds but whose end has passed is over: the
            # engine would otherwise postpone the mail "until" a past time, again and again,
            # for the snapshot's lifetime (a busy loop after each suspension, and after every
            # jump of the sandbox clock).
            if suspended is not None and suspended > search.now:
                search.reasons.append(
                    f"{ip.address} suspended for {provider} until {suspended:%H:%M:%S}Z"
                )
                search.waits.append(suspended)
                search.holds.add(HoldReason.suspended)
                waits_only = False
                continue
            plan = snap.ip_plans.get(ip.id) if snap.ip_plans else None
            if plan is None:
                if ip.state == IpState.cold:
                    search.reasons.append(f"{ip.address} is cold and has no warm-up plan")
                    search.holds.add(HoldReason.no_ip)
                    waits_only = False
                    continue
                warm.append((ip, None, 0))
                continue
            if plan.candidates == "marked" and not search.candidate:
                search.reasons.append(f"{ip.address} warms up on marked messages only")
                search.holds.add(HoldReason.capped)
                waits_only = False
                continue
            cap = snap.caps.get((ip.id, provider)) or snap.caps.get((ip.id, ALL_PROVIDERS))
            if cap is None:  # rows are ensured at load; a missing one still never means no cap
                search.reasons.append(f"{ip.address} has no warm-up cap for {provider} yet")
                search.holds.add(HoldReason.capped)
                waits_only = plan.overflow == "wait" and waits_only is not False
                continue
            allowance = self._allowance(cap, search)
            if self._used(cap, allowance, ip.address, search):
                waits_only = plan.overflow == "wait" and waits_only is not False
                continue
            warming.append((ip, cap, allowance))
        # Engaged first: a marked message tries the warming IPs (with room) before warm ones.
        # The rest go by the pool's weights over warm and warming IPs alike (a warming IP that
        # takes only marked mail is left out above): putting warm IPs first would starve a
        # warming IP in a mixed pool whenever the customer marks nothing.
        for group in (warming, warm) if search.candidate else (warm + warming,):
            while group:
                pick = self._rng.choices(group, weights=[c[0].weight for c in group])[0]
                ip, cap, allowance = pick
                taken = (
                    search.units
                    if cap is None
                    else self._reserve(snap, cap, allowance, search.units)
                )
                if taken:
                    day_id = None if cap is None else cap.day_id
                    source = SourceIp(ip.address, ip.ptr_name, pool)
                    return EgressChoice(source, day_id, units=taken), False
                group.remove(pick)  # other nodes used the rest of what is open today
                search.reasons.append(f"{ip.address} reached its warm-up cap for {provider} today")
                search.holds.add(HoldReason.capped)
                waits_only = cap.plan.overflow == "wait" and waits_only is not False
        if not snap.ips.get(pool_id):
            search.reasons.append(f"pool {pool} has no IP addresses")
            search.holds.add(HoldReason.held if pool == HOLD_POOL else HoldReason.no_ip)
        return None, bool(waits_only)

    def _allowance(self, cap: _Cap, search: _Search) -> int:
        """What the day has opened of the cap by now (a paused plan: nothing)."""
        if cap.plan.state == WarmupState.paused:
            return 0
        if search.now is None:
            search.now = self._clock.now()
        return min(cap.cap, opened(cap.cap, cap.plan.spread, search.now))

    @staticmethod
    def _used(cap: _Cap, allowance: int, subject: str, search: _Search) -> bool:
        """Whether nothing is left of what is open; if so, says why in search."""
        if cap.sent < allowance:
            return False
        provider = search.provider
        search.holds.add(HoldReason.capped)
        if cap.plan.state == WarmupState.paused:
            search.reasons.append(f"{subject}: warm-up paused, nothing sends for {provider}")
        elif allowance >= cap.cap:
            search.reasons.append(
                f"{subject} reached its warm-up cap of {cap.cap} for {provider} today"
            )
        else:
            now = search.now
            spread = cap.plan.spread
            hour = max(now.hour + 1, spread.first_hour)
            opens = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(hours=hour)
            search.waits.append(opens)
            search.reasons.append(
                f"{subject} sent {cap.sent} of its warm-up cap of {cap.cap} for {provider} "
                f"today; more opens at {opens:%H:%M}Z"
            )
        return True

    def _current(self) -> _Snapshot:
        with self._lock:
            snap = self._snapshot
            if (
                snap is not None
                and time.monotonic() - snap.loaded_at < self._ttl
                and (snap.day is None or self._clock.now().date() == snap.day)
            ):
                return snap
            snap = self._load()
            self._snapshot = snap
            return snap

    def _load(self) -> _Snapshot:
        now = self._clock.now()
        today = now.date()
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
            plans = conn.execute(
                select(
                    WarmupPlan.id,
                    WarmupPlan.ip_id,
                    Domain.name,
                    WarmupPlan.schedule_id,
                    WarmupPlan.state,
                    WarmupPlan.stages,
                    WarmupPlan.candidates,
                )
                .outerjoin(Domain, Domain.id == WarmupPlan.domain_id)
                .where(WarmupPlan.state.in_(CAPPED_STATES))
                .order_by(WarmupPlan.id)
            ).all()
            days = self._days(conn, [p.id for p in plans], today) if plans else []
        if not plans:
            return snap
        specs = {p.id: self._plan_spec(p.schedule_id) for p in plans}
        missing = self._missing(plans, specs, days, today)
        if missing:
            self._insert_days(missing)
            with self._engine.connect() as conn:
                days = self._days(conn, [p.id for p in plans], today)
        snap.day = today
        views = {}
        for p in plans:
            spec = specs[p.id]
            view = _Plan(p.id, p.state, p.candidates or "all", spec.overflow, spec.spread)
            views[p.id] = view
            if p.ip_id is not None:
                snap.ip_plans[p.ip_id] = view  # a newer plan of the same IP wins
        for row in days:
            plan = next(p for p in plans if p.id == row.plan_id)
            cap = _Cap(row.id, row.cap, row.sent, views[row.plan_id])
            snap.rows[row.id] = cap
            if plan.ip_id is not None:
                snap.caps[(plan.ip_id, row.provider)] = cap
            elif plan.name is not None:
                snap.domain_caps[(plan.name.lower(), row.provider)] = cap
        return snap

    @staticmethod
    def _days(conn, plan_ids: list[int], today: date) -> list:
        return conn.execute(
            select(
                WarmupDay.id, WarmupDay.plan_id, WarmupDay.provider, WarmupDay.cap, WarmupDay.sent
            )
            .where(WarmupDay.plan_id.in_(plan_ids), WarmupDay.day == today)
            .order_by(WarmupDay.plan_id)
        ).all()

    def _plan_spec(self, name: str) -> Plan:
        plans = self._warmup.plans
        if name in plans:
            return plans[name]
        if name not in self._unknown_plans:
            self._unknown_plans.add(name)
            log.warning(
                "warm-up plan %r is not in the runbook; capping at plan %r stage 1",
                name,
                self._warmup.default_plan,
            )
        return plans[self._warmup.default_plan]

    def _missing(self, plans, specs: dict[int, Plan], days, today: date) -> list[dict]:
        """Today's rows the control plane has not written yet, at the plan's cap for each
        provider's stage (a paused plan: 0; a plan the runbook does not know: stage 1)."""
        have = {(d.plan_id, d.provider) for d in days}
        rows = []
        for p in plans:
            known = p.schedule_id in self._warmup.plans
            stages = (p.stages or {}) if known else {}
            for provider in [*self._warmup.providers, ALL_PROVIDERS]:
                if (p.id, provider) in have:
                    continue
                stage = stages.get(provider, stages.get(ALL_PROVIDERS, 1))
                cap = 0 if p.state == WarmupState.paused else cap_for(specs[p.id], provider, stage)
                rows.append(
                    {
                        "plan_id": p.id,
                        "day": today,
                        "provider": provider,
                        "cap": cap,
                        "sent": 0,
                        "signals": {},
                    }
                )
        return rows

    def _insert_days(self, rows: list[dict]) -> None:
        """Insert if absent: several relay nodes (and the control plane) may write the same
        day at once; the unique (plan_id, day, provider) keeps one, whoever came first."""
        insert = sqlite_insert if is_sqlite(self._engine) else pg_insert
        stmt = insert(WarmupDay).on_conflict_do_nothing(
            index_elements=["plan_id", "day", "provider"]
        )
        with self._engine.begin() as conn:
            conn.execute(stmt, rows)


# When the IPs of a stream's pools wait for different reasons, the tally names one: a hold or
# a suspension (a decision about the sender) before a cap (a plan working as intended).
_HOLD_ORDER = (HoldReason.held, HoldReason.suspended, HoldReason.capped)


def _dominant(holds: set[HoldReason]) -> HoldReason:
    return next((h for h in _HOLD_ORDER if h in holds), HoldReason.no_ip)


def _utc(moment: datetime) -> datetime:
    from models.audit import as_utc

    return as_utc(moment)
