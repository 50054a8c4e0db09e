"""sandbox/reputation.py on a manual clock: cold IPs are rate limited, clean days warm them,
abuse blocks them, and a complaint rate over the published line damages them."""

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


def test_a_new_ip_is_cold_and_gets_only_its_burst_then_rate_limits(rep):
    cold = tier("cold")
    assert rep.tier("google", IP).name == "cold"
    admitted = [rep.admit("google", IP).admission for _ in range(cold.burst + 3)]
    assert admitted[: cold.burst] == ["ok"] * cold.burst
    assert admitted[cold.burst :] == ["rate_limited"] * 3


def test_tokens_come_back_at_the_tiers_rate(rep, clock):
    cold = tier("cold")
    for _ in range(cold.burst):
        assert rep.admit("google", IP).admission == "ok"
    assert rep.admit("google", IP).admission == "rate_limited"
    clock.advance(60 / cold.per_minute + 0.01)
    assert rep.admit("google", IP).admission == "ok"


def test_standings_are_per_provider_and_per_ip(rep):
    for _ in range(tier("cold").burst):
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


def test_pushing_into_the_limit_damages_then_blocks_the_ip(rep, clock):
    model = behaviour().reputation
    decisions = [rep.admit("yahoo", IP) for _ in range(200)]
    outcomes = [d.admission for d in decisions]
    tiers = [d.tier for d in decisions]
    first_block = outcomes.index("blocked")
    assert set(outcomes[: tier("cold").burst]) == {"ok"}
    assert set(outcomes[tier("cold").burst : first_block]) == {"rate_limited"}
    assert set(outcomes[first_block:]) == {"blocked"}
    # the limit tightened on the way: cold first, damaged before the block
    assert tiers[0] == "cold" and "damaged" in tiers[:first_block]
    assert rep.standing("yahoo", IP).score <= model.block_below
    assert rep.blocked("yahoo", IP)
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
    rep.penalise("yahoo", IP, "complaint")  # 1 in min_volume is far above 0.3 %
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
