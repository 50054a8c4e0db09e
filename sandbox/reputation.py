"""What a provider thinks of a source IP: a score, the rate it accepts, and whether it blocks.

One `Standing` per (provider, IP). The score starts cold and grows with clean deliveries, at
most `max_gain_per_minute`, so only steady volume warms an IP; it falls with every message
pushed into a limit, unknown mailbox, complaint or authentication failure. Its tier sets a
token bucket (the accepted rate). Reaching `block_below` blocks the IP for `block_seconds`.
A complaint rate above the published spam-rate line makes the IP "damaged" whatever its score.
Left alone, the score drifts back toward the initial score at `decay_per_day`. Time is the
world's clock (the sandbox clock: `axiom sandbox clock advance` moves blocks, windows, decay).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from sandbox.behaviour import ReputationModel, Tier
from sandbox.state import StandingRow

Event = Literal["rate_limited", "unknown_mailbox", "complaint", "auth_failure", "blocklisted"]
Admission = Literal["ok", "rate_limited", "blocked"]


@dataclass
class Standing:
    provider: str
    ip: str
    score: float
    tokens: float
    refilled_at: float
    blocked_until: float = 0.0
    gained: float = 0.0  # in the current minute
    gain_minute: int = 0
    accepted: int = 0
    deferred: int = 0
    rejected: int = 0
    complaints: int = 0
    deliveries: deque[float] = field(default_factory=deque)  # times, within the spam window
    complained: deque[float] = field(default_factory=deque)
    decayed_at: float = 0.0  # when decay was last applied


@dataclass(frozen=True)
class Decision:
    admission: Admission
    tier: str


class Reputation:
    def __init__(self, model: ReputationModel, clock: Callable[[], float] = time.time):
        self.model = model
        self.clock = clock
        self._standings: dict[tuple[str, str], Standing] = {}
        self.dirty: set[tuple[str, str]] = set()

    def standing(self, provider: str, ip: str) -> Standing:
        key = (provider, ip)
        found = self._standings.get(key)
        if found is None:
            tier = self.model.tier_for(self.model.initial_score)
            now = self.clock()
            found = Standing(provider, ip, self.model.initial_score, tier.burst, now)
            found.decayed_at = now
            self._standings[key] = found
        else:
            self._decay(found)
        return found

    def _decay(self, s: Standing) -> None:
        now = self.clock()
        drift = self.model.decay_per_day * (now - s.decayed_at) / 86400.0
        if drift < 0.01:  # let it build up: no rewrite of every standing 4 times a second
            return
        s.decayed_at = now
        gap = self.model.initial_score - s.score
        if gap:
            s.score += max(-drift, min(drift, gap))
            self._touch(s)

    def tier(self, provider: str, ip: str) -> Tier:
        s = self.standing(provider, ip)
        if self._spam_rate_exceeded(s):
            return next(t for t in self.model.tiers if t.name == "damaged")
        return self.model.tier_for(s.score)

    def blocked(self, provider: str, ip: str) -> bool:
        return self.standing(provider, ip).blocked_until > self.clock()

    def admit(self, provider: str, ip: str) -> Decision:
        """One message (recipient) wants in: take a token of the IP's current rate."""
        s = self.standing(provider, ip)
        tier = self.tier(provider, ip)
        if self.blocked(provider, ip):
            s.rejected += 1
            self._touch(s)
            return Decision("blocked", tier.name)
        now = self.clock()
        rate = tier.per_minute / 60.0
        s.tokens = min(float(tier.burst), s.tokens + (now - s.refilled_at) * rate)
        s.refilled_at = now
        if s.tokens >= 1.0:
            s.tokens -= 1.0
            return Decision("ok", tier.name)
        s.deferred += 1
        self.penalise(provider, ip, "rate_limited")
        return Decision("blocked" if self.blocked(provider, ip) else "rate_limited", tier.name)

    def delivered(self, provider: str, ip: str) -> None:
        s = self.standing(provider, ip)
        now = self.clock()
        minute = int(now // 60)
        if minute != s.gain_minute:
            s.gain_minute, s.gained = minute, 0.0
        gain = min(self.model.clean_delivery_gain, self.model.max_gain_per_minute - s.gained)
        if gain > 0:
            s.gained += gain
            s.score = min(self.model.max_score, s.score + gain)
        s.accepted += 1
        s.deliveries.append(now)
        self._trim(s, now)
        self._touch(s)

    def penalise(self, provider: str, ip: str, event: Event) -> None:
        s = self.standing(provider, ip)
        now = self.clock()
        s.score = max(self.model.min_score, s.score - getattr(self.model.losses, event))
        if event == "complaint":
            s.complaints += 1
            s.complained.append(now)
            self._trim(s, now)
        elif event != "rate_limited":
            s.rejected += 1
        if s.score <= self.model.block_below and s.blocked_until <= now:
            s.blocked_until = now + self.model.block_seconds
        self._touch(s)

    # --- steering (CLI commands) and persistence ---
    def set_score(self, providers: Iterable[str], ip: str, score: float) -> list[Standing]:
        """Put an IP at a score at these providers, unblocked, with a fresh spam-rate window."""
        changed = []
        for p in providers:
            s = self.standing(p, ip)
            s.score = max(self.model.min_score, min(self.model.max_score, score))
            s.blocked_until = 0.0
            s.tokens = float(self.model.tier_for(s.score).burst)
            s.refilled_at = s.decayed_at = self.clock()
            s.deliveries.clear()
            s.complained.clear()
            self._touch(s)
            changed.append(s)
        return changed

    def reset(self, provider: str | None, ip: str | None) -> int:
        """Forget standings (back to cold); None matches every provider or IP."""
        gone = [
            k
            for k in self._standings
            if (provider is None or k[0] == provider) and (ip is None or k[1] == ip)
        ]
        for key in gone:
            del self._standings[key]
            self.dirty.discard(key)
        return len(gone)

    def restore(self, rows: Iterable[StandingRow]) -> None:
        for row in rows:
            s = self.standing(row.provider, row.ip)
            s.score, s.blocked_until = row.score, row.blocked_until
            s.accepted, s.deferred, s.rejected = row.accepted, row.deferred, row.rejected
            s.complaints = row.complaints
            s.tokens = float(self.model.tier_for(row.score).burst)
            s.decayed_at = row.updated_at  # the time it stood still counts toward decay

    def age(self) -> None:
        """Apply decay to every standing, touched or not, so status shows what time did."""
        for s in self._standings.values():
            self._decay(s)

    def take_dirty(self) -> list[StandingRow]:
        rows = [self.row(*key) for key in sorted(self.dirty) if key in self._standings]
        self.dirty.clear()
        return rows

    def row(self, provider: str, ip: str) -> StandingRow:
        s = self.standing(provider, ip)
        return StandingRow(
            provider,
            ip,
            round(s.score, 2),
            s.blocked_until,
            s.accepted,
            s.deferred,
            s.rejected,
            s.complaints,
            self.clock(),
        )

    def _touch(self, s: Standing) -> None:
        self.dirty.add((s.provider, s.ip))

    def _trim(self, s: Standing, now: float) -> None:
        horizon = now - self.model.spam_rate.window_seconds
        for times in (s.deliveries, s.complained):
            while times and times[0] < horizon:
                times.popleft()

    def _spam_rate_exceeded(self, s: Standing) -> bool:
        rule = self.model.spam_rate
        self._trim(s, self.clock())
        volume = len(s.deliveries)
        return volume >= rule.min_volume and len(s.complained) / volume > rule.limit
