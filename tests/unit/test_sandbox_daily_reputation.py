"""The simulated providers judge an IP by its volume per day and its history (issue 15), on a
fake world clock moved day by day: a cold IP pushed hard is deferred then blocked; one that
follows the `sandbox` warm-up plan never is; history grows per clean sending day, cools when
idle, and stops growing on a day with complaints or unknown mailboxes."""

from __future__ import annotations

import sqlite3
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from sandbox.behaviour import behaviour
from sandbox.reputation import DAY, Reputation
from sandbox.state import StateStore

IP = "127.0.0.10"
RUNBOOK = Path(__file__).resolve().parents[2] / "runbooks" / "ip-warmup.yaml"
START_DAY = 20_000  # a Monday (1 October 2024, UTC): day numbers of the world's clock
SPACING = 10.0  # seconds between messages: under every tier's short-term rate


class Clock:
    def __init__(self) -> None:
        self.now = START_DAY * DAY

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rep(clock) -> Reputation:
    return Reputation(behaviour().reputation, clock)


def sandbox_plan() -> list[int]:
    return yaml.safe_load(RUNBOOK.read_text())["spec"]["plans"]["sandbox"]["stages"]


def send_day(
    rep: Reputation,
    clock: Clock,
    day: int,
    volume: int,
    *,
    provider: str = "google",
    ip: str = IP,
    bad: tuple[str, int] = ("", 0),
    hour: int = 1,
) -> Counter:
    """Offer `volume` recipients on day `day` (from START_DAY), one every SPACING seconds from
    `hour`; `bad` = (event, n): the last n admitted draw that event instead of a clean
    delivery. Returns the admissions."""
    event, n_bad = bad
    clean_first = volume - n_bad
    clock.now = (START_DAY + day) * DAY + hour * 3600
    seen: Counter = Counter()
    for _ in range(volume):
        clock.now += SPACING
        admission = rep.admit(provider, ip).admission
        seen[admission] += 1
        if admission != "ok":
            continue
        if seen["ok"] <= clean_first:
            rep.delivered(provider, ip)
        elif event == "complaint":
            rep.delivered(provider, ip)
            rep.penalise(provider, ip, "complaint")
        else:  # unknown_mailbox at RCPT, auth_failure at DATA: never delivered
            rep.penalise(provider, ip, event)  # type: ignore[arg-type]
    return seen


def at_midnight(rep: Reputation, clock: Clock, day: int, provider: str = "google") -> float:
    """The allowance the provider gives the IP on day `day`, as it starts."""
    clock.now = (START_DAY + day) * DAY
    return rep.allowance(provider, IP)


def test_a_cold_ip_pushed_300_a_day_is_deferred_then_blocked_for_a_day(rep, clock):
    daily = behaviour().reputation.daily
    cold = at_midnight(rep, clock, 0)
    assert cold == daily.cold_allowance
    first = send_day(rep, clock, 0, 300)
    # the allowance, then deferrals (4xx) until twice the allowance was offered, then the block
    assert first["ok"] == cold
    assert first["rate_limited"] == pytest.approx((daily.push_block_factor - 1) * cold, abs=1)
    assert first["blocked"] == 300 - first["ok"] - first["rate_limited"] > 0
    blocked_at = (START_DAY * DAY) + 3600 + (first["ok"] + first["rate_limited"]) * SPACING
    assert rep.standing("google", IP).blocked_until == pytest.approx(
        blocked_at + daily.push_block_seconds
    )
    # a day later, still pushing: the block runs out, the next push blocks again at once
    second = send_day(rep, clock, 1, 300)
    assert second["blocked"] >= 300 - cold and second["ok"] <= cold
    for day in range(2, 6):  # it never earns more
        assert at_midnight(rep, clock, day) <= cold
        assert send_day(rep, clock, day, 300)["blocked"] > 0


def test_the_sandbox_plan_stays_inside_the_allowance_and_warms_the_ip(rep, clock):
    stages = sandbox_plan()
    assert stages[:3] == [20, 30, 45]  # the plan this test was written for
    volumes = [*stages, stages[-1], stages[-1], stages[-1]]  # then holds its last stage
    allowances, tiers = [], []
    for day, volume in enumerate(volumes):
        allowances.append(at_midnight(rep, clock, day))
        tiers.append(rep.tier("google", IP).name)
        seen = send_day(rep, clock, day, volume)
        assert seen == Counter(ok=volume), (day, seen)
        assert not rep.blocked("google", IP)
        assert rep.verdict(rep.standing("google", IP)) == "clean"
    assert all(b > a for a, b in pairwise(allowances)), allowances
    assert all(v <= a for v, a in zip(volumes, allowances, strict=True))
    assert tiers[0] == "cold" and tiers[1] == "warming" and tiers[-1] == "established"
    assert "established" not in tiers[:5]  # days of consistent volume, not minutes


def test_microsofts_half_share_still_counts_as_clean_sending(rep, clock):
    half = [s // 2 for s in sandbox_plan()[:3]]  # the plan's Microsoft share, first 3 stages
    before = at_midnight(rep, clock, 0, "microsoft")
    for day, volume in enumerate(half):
        assert send_day(rep, clock, day, volume, provider="microsoft") == Counter(ok=volume)
    growth = behaviour().reputation.daily.growth_per_clean_day
    assert at_midnight(rep, clock, len(half), "microsoft") == pytest.approx(
        before * growth ** len(half)
    )


def test_history_grows_per_sending_day_and_a_month_idle_is_cold_again(rep, clock):
    daily = behaviour().reputation.daily
    sending = [d for d in range(21) if d % 7 in (0, 2, 4)]  # Monday, Wednesday, Friday
    for day in sending:
        volume = int(at_midnight(rep, clock, day) * 0.6)
        assert send_day(rep, clock, day, volume)["ok"] == volume
    after_three_weeks = at_midnight(rep, clock, 21)
    # 9 clean sending days, not 21 calendar days: the week-end gaps cost nothing
    assert after_three_weeks == pytest.approx(
        daily.cold_allowance * daily.growth_per_clean_day ** len(sending)
    )
    assert after_three_weeks < daily.cold_allowance * daily.growth_per_clean_day**21 / 100
    # then nothing for 30 days: back near the cold allowance, and cold
    idle = at_midnight(rep, clock, sending[-1] + 31)
    assert daily.cold_allowance <= idle < 1.15 * daily.cold_allowance
    assert rep.tier("google", IP).name == "cold"
    # a week idle costs some history, not all of it
    other = Reputation(behaviour().reputation, clock)
    other.set_score(["google"], "127.0.0.12", 90)  # 9 clean days
    clock.now += 7 * DAY
    assert 0.2 < other.allowance("google", "127.0.0.12") / after_three_weeks < 0.7


@pytest.mark.parametrize(
    ("event", "count"), [("complaint", 1), ("unknown_mailbox", 10), ("auth_failure", 3)]
)
def test_a_day_with_complaints_or_bad_recipients_stops_the_rise(rep, clock, event, count):
    # The bad day is the last one: a complaint rate over the spam-rate line also makes the IP
    # "damaged" at the minute scale for the next 24 hours, a different rule.
    clean = Reputation(behaviour().reputation, clock)
    for day, volume in enumerate(sandbox_plan()[:4]):
        for r in (rep, clean):
            at_midnight(r, clock, day)
        spoilt = day == 3
        send_day(rep, clock, day, volume, bad=(event, count) if spoilt else ("", 0))
        send_day(clean, clock, day, volume)
        assert rep.verdict(rep.standing("google", IP)) == ("held" if spoilt else "clean")
    at_midnight(clean, clock, 4)
    held, rose = at_midnight(rep, clock, 4), clean.allowance("google", IP)
    growth = behaviour().reputation.daily.growth_per_clean_day
    assert held == pytest.approx(rose / growth)  # one day less of history, nothing more
    assert rep.standing("google", IP).score < clean.standing("google", IP).score


def test_pushing_past_the_allowance_without_a_block_takes_history_back(rep, clock):
    daily = behaviour().reputation.daily
    for day in range(3):
        send_day(rep, clock, day, 20)
    allowance = at_midnight(rep, clock, 3)
    seen = send_day(rep, clock, 3, int(allowance) + 10)  # 10 past it, far from twice it
    assert seen["ok"] == pytest.approx(allowance, abs=1) and seen["rate_limited"] >= 9
    assert "blocked" not in seen
    assert at_midnight(rep, clock, 4) == pytest.approx(allowance / daily.growth_per_clean_day)


def test_short_term_rate_still_applies_within_the_day(rep, clock):
    """The tiers' token buckets stay as the short-term limit. They hold the day's allowance
    (daily.burst_share), so a day sent at once within it passes; a new day's allowance
    spent right after the old day's burst meets the empty bucket, which refills at the
    tier's rate."""
    daily = behaviour().reputation.daily
    clock.now = (START_DAY + 1) * DAY - 2  # the last seconds of a day
    burst = int(daily.burst_share * rep.allowance("google", IP))
    assert burst == daily.cold_allowance
    assert [rep.admit("google", IP).admission for _ in range(burst)] == ["ok"] * burst
    assert rep.verdict(rep.standing("google", IP)) == "quiet"  # nothing delivered yet
    clock.now = (START_DAY + 1) * DAY  # 2 s later: a new day, its allowance unused
    tier = rep.tier("google", IP)
    assert rep.admit("google", IP).admission == "rate_limited"  # the bucket is empty
    clock.now += 60 / tier.per_minute + 0.01
    assert rep.admit("google", IP).admission == "ok"


def test_history_and_todays_counts_survive_a_world_restart(rep, clock, tmp_path):
    for day in range(3):
        send_day(rep, clock, day, 30)
    send_day(rep, clock, 3, 12)  # part of day 3
    state = StateStore(tmp_path / "state.db")
    state.save_standings(rep.take_dirty())
    [row] = state.standings()
    assert (row.day, row.clean_days, row.today["delivered"]) == (START_DAY + 3, 3.0, 12)
    assert row.allowance == pytest.approx(at_midnight(rep, clock, 3), abs=0.1)

    clock.now = (START_DAY + 3) * DAY + 7200  # the same day, a fresh world
    again = Reputation(behaviour().reputation, clock)
    again.restore(state.standings())
    assert again.standing("google", IP).today.delivered == 12
    assert again.allowance("google", IP) == rep.allowance("google", IP)
    send_day(again, clock, 3, 13, hour=3)  # the day carries on; it closes clean at midnight
    clock.now = (START_DAY + 4) * DAY
    assert again.standing("google", IP).clean_days == 4


def test_an_older_state_file_gains_the_daily_columns(tmp_path, clock):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE standing (provider TEXT NOT NULL, ip TEXT NOT NULL, score REAL NOT NULL,"
        " blocked_until REAL NOT NULL, accepted INTEGER NOT NULL, deferred INTEGER NOT NULL,"
        " rejected INTEGER NOT NULL, complaints INTEGER NOT NULL, updated_at REAL NOT NULL,"
        " PRIMARY KEY (provider, ip))"
    )
    db.execute("INSERT INTO standing VALUES ('yahoo', ?, 90, 0, 5, 0, 0, 0, ?)", (IP, clock.now))
    db.commit()
    db.close()
    [row] = StateStore(path).standings()
    assert (row.score, row.day, row.today) == (90, 0, {})
    rep = Reputation(behaviour().reputation, clock)
    rep.restore([row])
    # the history its score stands for, from today: no month-long idle gap since day 0
    gain = behaviour().reputation.daily.clean_day_gain
    assert rep.standing("yahoo", IP).clean_days == pytest.approx(90 / gain)
    assert rep.tier("yahoo", IP).name == "established"
