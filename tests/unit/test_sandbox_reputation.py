"""sandbox/reputation.py on a manual clock: cold IPs are deferred past their day's allowance,
clean days warm them, abuse blocks them, and a complaint rate over the published line damages
them (a damaged IP gets its tier's short-term rate only)."""

from __future__ import annotations

import pytest

from sandbox.behaviour import behaviour
from sandbox.reputation import Reputation

IP = "127.0.0.10"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rep(clock) -> Reputation:
    return Reputation(behaviour().reputation, clock)


def tier(name: str):
    return next(t for t in behaviour().reputation.tiers if t.name == name)


def cold_allowance() -> int:
    return int(behaviour().reputation.daily.cold_allowance)


def test_a_new_ip_is_cold_and_gets_its_days_allowance_at_once_then_is_deferred(rep):
    # The short-term bucket holds the day's allowance (daily.burst_share 1.0): a cold IP's
    # 40 may come at once; what follows meets the day's limit.
    assert behaviour().reputation.daily.burst_share == 1.0
    assert rep.tier("google", IP).name == "cold"
    admitted = [rep.admit("google", IP).admission for _ in range(cold_allowance() + 3)]
    assert admitted[: cold_allowance()] == ["ok"] * cold_allowance()
    assert admitted[cold_allowance() :] == ["rate_limited"] * 3


def test_a_damaged_ip_gets_its_tiers_burst_and_rate_only(rep, clock):
    damaged = tier("damaged")
    rep.set_score(["google"], IP, -50)
    assert rep.tier("google", IP).name == "damaged"
    for _ in range(damaged.burst):
        assert rep.admit("google", IP).admission == "ok"
    assert rep.admit("google", IP).admission == "rate_limited"
    clock.advance(60 / damaged.per_minute + 0.01)
    assert rep.admit("google", IP).admission == "ok"


def test_standings_are_per_provider_and_per_ip(rep):
    for _ in range(cold_allowance()):
        rep.admit("google", IP)
    assert rep.admit("google", IP).admission == "rate_limited"
    assert rep.admit("yahoo", IP).admission == "ok"
    assert rep.admit("google", "127.0.0.11").admission == "ok"


def test_clean_volume_warms_an_ip_by_the_day_not_by_the_minute(rep, clock):
    """A day of clean mail, however much, counts as one day: established takes days."""
    model = behaviour().reputation
    days = 0  # clean sending days behind the IP
    while True:
        clock.now = (10 + days) * 86400.0  # midnight UTC: the day before is judged
        if rep.tier("google", IP).name == "established":
            break
        assert rep.tier("google", IP).name == ("warming" if days else "cold")
        for _ in range(30):  # a steady day: one every 10 minutes, within the allowance
            clock.advance(600)
            assert rep.admit("google", IP).admission == "ok"
            rep.delivered("google", IP)
        # however much clean mail: nothing changes before the day is over
        assert rep.standing("google", IP).score == model.initial_score + days * (
            model.daily.clean_day_gain
        )
        days += 1
        assert days < 20
    clean_days_to_establish = tier("established").min_score / model.daily.clean_day_gain
    assert days == clean_days_to_establish


def test_pushing_past_the_allowance_damages_then_blocks_the_ip_for_a_day(rep, clock):
    model = behaviour().reputation
    decisions = [rep.admit("yahoo", IP) for _ in range(200)]
    outcomes = [d.admission for d in decisions]
    tiers = [d.tier for d in decisions]
    first_block = outcomes.index("blocked")
    pushed_to = int(model.daily.push_block_factor * cold_allowance())
    assert set(outcomes[: cold_allowance()]) == {"ok"}
    assert set(outcomes[cold_allowance() : first_block]) == {"rate_limited"}
    assert first_block == pushed_to - 1  # offered twice the allowance: blocked
    assert set(outcomes[first_block:]) == {"blocked"}
    # the limit tightened on the way: cold first, damaged before the block
    assert tiers[0] == "cold" and "damaged" in tiers[:first_block]
    clock.advance(model.daily.push_block_seconds - 1)
    assert rep.admit("yahoo", IP).admission == "blocked"
    clock.advance(2)
    assert not rep.blocked("yahoo", IP)


def test_a_score_at_the_block_line_blocks_the_ip(rep, clock):
    model = behaviour().reputation
    rep.set_score(["yahoo"], IP, 90)
    while not rep.blocked("yahoo", IP):
        rep.penalise("yahoo", IP, "unknown_mailbox")
        assert rep.standing("yahoo", IP).score >= model.min_score
    assert rep.standing("yahoo", IP).score <= model.block_below
    clock.advance(model.block_seconds - 1)
    assert rep.admit("yahoo", IP).admission == "blocked"
    clock.advance(2)
    assert not rep.blocked("yahoo", IP)
    assert rep.tier("yahoo", IP).name == "damaged"


def test_a_complaint_rate_over_the_spam_rate_line_damages_a_warm_ip(rep):
    model = behaviour().reputation
    rep.set_score(["yahoo"], IP, 90)
    assert rep.tier("yahoo", IP).name == "established"
    for _ in range(model.spam_rate.min_volume):
        rep.delivered("yahoo", IP)
    assert rep.tier("yahoo", IP).name == "established"  # no complaint yet
    rep.penalise("yahoo", IP, "complaint")  # 1 in min_volume is far above 0.3 %, but alone
    assert model.spam_rate.min_complaints == 2
    assert rep.tier("yahoo", IP).name == "established"
    rep.penalise("yahoo", IP, "complaint")
    assert rep.tier("yahoo", IP).name == "damaged"


def test_a_complaint_below_the_minimum_volume_does_not_flip_the_tier(rep):
    rep.set_score(["yahoo"], IP, 90)
    for _ in range(10):
        rep.delivered("yahoo", IP)
    rep.penalise("yahoo", IP, "complaint")
    assert rep.tier("yahoo", IP).name == "established"


def test_reset_forgets_and_dirty_rows_are_reported_once(rep):
    rep.admit("google", IP)
    rep.penalise("google", IP, "unknown_mailbox")
    rows = rep.take_dirty()
    assert [(r.provider, r.ip) for r in rows] == [("google", IP)]
    assert rows[0].score < 0
    assert rep.take_dirty() == []
    assert rep.reset(None, IP) == 1
    assert rep.standing("google", IP).score == behaviour().reputation.initial_score
