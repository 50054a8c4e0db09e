"""What a provider thinks of a source IP: its history, today's allowance, its rate, its blocks.

One `Standing` per (provider, IP), judged on two time scales of the world's clock (the sandbox
clock: `axiom sandbox clock advance 1d` starts a new day here as everywhere):

- Per UTC day. The provider tolerates an allowance of messages today, grown from the IP's
  history: `cold_allowance` for a new IP, times `growth_per_clean_day` for each clean sending
  day so far. When a day ends it is judged: a clean day (enough volume, within the allowance,
  few complaints, unknown mailboxes, failures and deferrals) adds a clean day and
  `clean_day_gain` to the score; a day pushed past the allowance or blocked takes
  `pushed_day_setback` clean days back; any other day changes nothing. Idle days beyond a
  grace halve the history (clean days and the score above the initial score) every
  `idle_half_life_days`. Past today's allowance the provider defers; offered
  `push_block_factor` times it, the provider blocks the IP for `push_block_seconds`.
- Per minute. The score's tier sets a token bucket, the short-term rate; the bucket holds at
  least `burst_share` of today's allowance (a damaged IP's excepted), so a day sent within
  the allowance is not deferred for arriving at once, as a warm-up plan's day does, and a
  cold IP pushed past its allowance meets the day's limit, then the block. The score falls with
  every message pushed into a limit, unknown mailbox, complaint or authentication failure;
  reaching `block_below` blocks the IP for `block_seconds`. Below the initial score it recovers
  at `decay_per_day`. A complaint rate above the published spam-rate line (on enough mail and
  more than one complaint) makes the IP "damaged" whatever its score.

The same arithmetic keeps a From domain's standing at each provider (sandbox/placement.py): a
second `Reputation`, keyed by the organisational domain where this one has the IP, fed at DATA
only (`offered`, `delivered`, complaints and authentication failures) and never asked to admit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from sandbox.behaviour import ReputationModel, Tier
from sandbox.state import StandingRow

Event = Literal[
    "rate_limited",
    "over_allowance",
    "unknown_mailbox",
    "complaint",
    "auth_failure",
    "blocklisted",
]
Admission = Literal["ok", "rate_limited", "blocked"]
Verdict = Literal["clean", "pushed", "held", "quiet", "idle"]
DAY = 86400.0


@dataclass
class Day:
    """What one provider saw from one IP during one UTC day."""

    offered: int = 0  # recipients offered (RCPT), whatever the answer
    admitted: int = 0  # taken: these count toward the allowance
    delivered: int = 0
    deferred: int = 0  # by the short-term rate (token bucket)
    over: int = 0  # deferred because the day's allowance was used up
    refused: int = 0  # while blocked
    blocks: int = 0  # blocks imposed this day
    unknown: int = 0
    complaints: int = 0
    auth_failures: int = 0


@dataclass
class Standing:
    provider: str
    ip: str
    score: float
    tokens: float
    refilled_at: float
    blocked_until: float = 0.0
    accepted: int = 0
    deferred: int = 0
    rejected: int = 0
    complaints: int = 0
    deliveries: deque[float] = field(default_factory=deque)  # times, within the spam window
    complained: deque[float] = field(default_factory=deque)
    inboxed: deque[float] = field(default_factory=deque)  # delivered to the inbox, same window
    decayed_at: float = 0.0  # when recovery was last applied
    clean_days: float = 0.0
    day: int = 0  # the UTC day `today` counts
    last_active_day: int = 0
    today: Day = field(default_factory=Day)


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
            found = Standing(provider, ip, self.model.initial_score, 0.0, now)
            found.decayed_at = now
            found.day = found.last_active_day = self._today()
            found.tokens = self._bucket(found, tier)
            self._standings[key] = found
        else:
            self._close_days(found)
            self._decay(found)
        return found

    def allowance(self, provider: str, ip: str) -> float:
        """Messages the provider takes from the IP today."""
        return self.model.daily.allowance(self.standing(provider, ip).clean_days)

    def _bucket(self, s: Standing, tier: Tier) -> float:
        """The short-term bucket's size: the tier's burst, or the share of today's allowance
        when larger. A provider that takes N messages a day from an IP takes them in one go
        too (a campaign, a warm-up plan's day); a damaged IP gets its tier's rate only."""
        if tier.name == "damaged":
            return float(tier.burst)
        daily = self.model.daily
        return max(float(tier.burst), daily.burst_share * daily.allowance(s.clean_days))

    # --- the day scale ---
    def _today(self) -> int:
        return int(self.clock() // DAY)

    def _close_days(self, s: Standing) -> None:
        """Judge the day(s) that ended since s was last seen, then cool its idle days."""
        today = self._today()
        if s.day >= today:
            return
        daily = self.model.daily
        verdict = self.verdict(s)
        if verdict == "clean":
            s.clean_days += 1
            s.score = min(self.model.max_score, s.score + daily.clean_day_gain)
        elif verdict == "pushed":
            s.clean_days = max(0.0, s.clean_days - daily.pushed_day_setback)
        if verdict != "idle":
            s.last_active_day = s.day
        # Idle days past the grace halve the history; those before s.day were charged already.
        charged_before = max(0, s.day - 1 - s.last_active_day - daily.idle_grace_days)
        charged_now = max(0, today - 1 - s.last_active_day - daily.idle_grace_days)
        if charged_now > charged_before:
            keep = 0.5 ** ((charged_now - charged_before) / daily.idle_half_life_days)
            s.clean_days *= keep
            above = s.score - self.model.initial_score
            if above > 0:
                s.score = self.model.initial_score + above * keep
        s.day, s.today = today, Day()
        self._touch(s)

    def verdict(self, s: Standing) -> Verdict:
        """What the provider makes of s's current day, were it to end now."""
        t, rule = s.today, self.model.daily.clean_day
        if t.offered == 0:
            return "idle"
        if t.over or t.refused or t.blocks:
            return "pushed"
        if t.delivered < rule.min_delivered:
            return "quiet"
        if (
            t.complaints > rule.max_complaint_rate * t.delivered
            or t.unknown > rule.max_unknown_share * t.offered
            or t.auth_failures > rule.max_auth_failure_share * t.offered
            or t.deferred > rule.max_deferred_share * t.offered
        ):
            return "held"
        return "clean"

    def _decay(self, s: Standing) -> None:
        """A score below the initial one recovers with time (a damaged IP heals when left alone)."""
        now = self.clock()
        drift = self.model.decay_per_day * (now - s.decayed_at) / DAY
        if drift < 0.01:  # let it build up: no rewrite of every standing 4 times a second
            return
        s.decayed_at = now
        gap = self.model.initial_score - s.score
        if gap > 0:
            s.score += min(drift, gap)
            self._touch(s)

    # --- the minute scale and the answers ---
    def tier(self, provider: str, ip: str) -> Tier:
        s = self.standing(provider, ip)
        if self._spam_rate_exceeded(s):
            return next(t for t in self.model.tiers if t.name == "damaged")
        return self.model.tier_for(s.score)

    def blocked(self, provider: str, ip: str) -> bool:
        return self.standing(provider, ip).blocked_until > self.clock()

    def refused(self, provider: str, ip: str) -> None:
        """A blocked IP tried again (MAIL FROM): the provider notes it against the day."""
        s = self.standing(provider, ip)
        s.today.refused += 1
        s.rejected += 1
        self._touch(s)

    def admit(self, provider: str, ip: str) -> Decision:
        """One message (recipient) wants in: within today's allowance, at the tier's rate."""
        s = self.standing(provider, ip)
        tier = self.tier(provider, ip)
        s.today.offered += 1
        self._touch(s)
        if self.blocked(provider, ip):
            s.rejected += 1
            s.today.refused += 1
            return Decision("blocked", tier.name)
        daily = self.model.daily
        allowance = daily.allowance(s.clean_days)
        if s.today.admitted >= allowance:
            s.deferred += 1
            s.today.over += 1
            if s.today.admitted + s.today.over >= daily.push_block_factor * allowance:
                self._block(s, daily.push_block_seconds)
            self.penalise(provider, ip, "over_allowance")
            return Decision("blocked" if self.blocked(provider, ip) else "rate_limited", tier.name)
        now = self.clock()
        rate = tier.per_minute / 60.0
        s.tokens = min(self._bucket(s, tier), s.tokens + (now - s.refilled_at) * rate)
        s.refilled_at = now
        if s.tokens >= 1.0:
            s.tokens -= 1.0
            s.today.admitted += 1
            return Decision("ok", tier.name)
        s.deferred += 1
        s.today.deferred += 1
        self.penalise(provider, ip, "rate_limited")
        return Decision("blocked" if self.blocked(provider, ip) else "rate_limited", tier.name)

    def delivered(self, provider: str, ip: str) -> None:
        s = self.standing(provider, ip)
        now = self.clock()
        s.accepted += 1
        s.today.delivered += 1
        s.deliveries.append(now)
        self._trim(s, now)
        self._touch(s)

    def offered(self, provider: str, key: str) -> None:
        """One message offered and taken outside admit(): a From domain's standing, judged by
        the same day arithmetic as an IP's but never rate-limited."""
        s = self.standing(provider, key)
        s.today.offered += 1
        s.today.admitted += 1
        self._touch(s)

    def inboxed(self, provider: str, ip: str) -> None:
        """A delivered message went to the inbox: the base of the placement's complaint rate."""
        s = self.standing(provider, ip)
        now = self.clock()
        s.inboxed.append(now)
        self._trim(s, now)

    def inbox_complaints(self, provider: str, ip: str) -> tuple[int, int]:
        """(delivered to the inbox, complaints) within the spam-rate window."""
        s = self.standing(provider, ip)
        self._trim(s, self.clock())
        return len(s.inboxed), len(s.complained)

    def penalise(self, provider: str, ip: str, event: Event) -> None:
        s = self.standing(provider, ip)
        now = self.clock()
        s.score = max(self.model.min_score, s.score - getattr(self.model.losses, event))
        if event == "complaint":
            s.complaints += 1
            s.today.complaints += 1
            s.complained.append(now)
            self._trim(s, now)
        elif event == "unknown_mailbox":
            s.rejected += 1
            s.today.unknown += 1
        elif event == "auth_failure":
            s.rejected += 1
            s.today.auth_failures += 1
        elif event == "blocklisted":
            s.rejected += 1
        if s.score <= self.model.block_below:
            self._block(s, self.model.block_seconds)
        self._touch(s)

    def _block(self, s: Standing, seconds: float) -> None:
        until = self.clock() + seconds
        if until > s.blocked_until:
            if s.blocked_until <= self.clock():
                s.today.blocks += 1
            s.blocked_until = until

    # --- steering (CLI commands) and persistence ---
    def set_score(self, providers: Iterable[str], ip: str, score: float) -> list[Standing]:
        """Put an IP at a score at these providers, unblocked, with a fresh spam-rate window,
        and the history that score stands for (one clean day per `clean_day_gain` points)."""
        changed = []
        for p in providers:
            s = self.standing(p, ip)
            s.score = max(self.model.min_score, min(self.model.max_score, score))
            s.clean_days = max(0.0, s.score - self.model.initial_score) / (
                self.model.daily.clean_day_gain
            )
            s.day = s.last_active_day = self._today()
            s.today = Day()
            s.blocked_until = 0.0
            s.tokens = self._bucket(s, self.model.tier_for(s.score))
            s.refilled_at = s.decayed_at = self.clock()
            s.deliveries.clear()
            s.complained.clear()
            s.inboxed.clear()
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
        known = {f.name for f in fields(Day)}
        for row in rows:
            s = self.standing(row.provider, row.ip)
            s.score, s.blocked_until = row.score, row.blocked_until
            s.accepted, s.deferred, s.rejected = row.accepted, row.deferred, row.rejected
            s.complaints = row.complaints
            s.decayed_at = row.updated_at  # the time it stood still counts toward recovery
            if row.day:
                s.clean_days, s.day = row.clean_days, row.day
                s.last_active_day = row.last_active_day
                s.today = Day(**{k: int(v) for k, v in row.today.items() if k in known})
            else:  # a row from before the daily model: the history its score stands for
                gain = self.model.daily.clean_day_gain
                s.clean_days = max(0.0, row.score - self.model.initial_score) / gain
            self._close_days(s)  # the days the world was down end now, judged as they stood
            s.tokens = self._bucket(s, self.tier(row.provider, row.ip))

    def age(self) -> None:
        """Close days and recover scores for every standing, touched or not, so status shows
        what time did."""
        for s in self._standings.values():
            self._close_days(s)
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
            round(s.clean_days, 3),
            round(self.model.daily.allowance(s.clean_days), 1),
            s.day,
            s.last_active_day,
            asdict(s.today),
        )

    def _touch(self, s: Standing) -> None:
        self.dirty.add((s.provider, s.ip))

    def _trim(self, s: Standing, now: float) -> None:
        horizon = now - self.model.spam_rate.window_seconds
        for times in (s.deliveries, s.complained, s.inboxed):
            while times and times[0] < horizon:
                times.popleft()

    def _spam_rate_exceeded(self, s: Standing) -> bool:
        rule = self.model.spam_rate
        self._trim(s, self.clock())
        volume, complaints = len(s.deliveries), len(s.complained)
        return (
            volume >= rule.min_volume
            and complaints >= rule.min_complaints
            and complaints / volume > rule.limit
        )
