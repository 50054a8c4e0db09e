"""protocol/warmup.decide: the warm-up runbook's daily decision, at and around every threshold
of runbooks/ip-warmup.yaml (judgement), and the plan arithmetic of runbooks/warmup.py."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from protocol.warmup import Evidence, ProviderDay, decide, judge
from runbooks.loader import ip_warmup
from runbooks.schema_warmup import Plan, Spread
from runbooks.warmup import cap_for, day_caps, opened

RULES = ip_warmup()
J = RULES.spec.judgement
PLAN = Plan(
    description="test",
    source="test",
    stages=[100, 200, 400],
    shares={"microsoft": [{"until_stage": 1, "share": 0.5}]},
)
DAY = date(2026, 12, 1)


def day(provider="google", cap=100, sent=100, **kw) -> ProviderDay:
    kw.setdefault("delivered", sent - kw.get("rate_limited", 0) - kw.get("reputation", 0))
    return ProviderDay(provider=provider, cap=cap, sent=sent, **kw)


def ev(*days: ProviderDay, stages=None, progressed=DAY, listed=False) -> Evidence:
    return Evidence(
        "ip:127.0.0.10",
        DAY,
        stages or {"*": 1},
        {d.provider: d for d in days},
        progressed,
        listed=listed,
    )


def test_the_shipped_thresholds_are_the_ones_these_tables_are_written_for():
    assert (J.advance_min_fill, J.min_sent_to_judge) == (0.9, 20)
    assert (J.yellow_rate_limited, J.yellow_reputation) == (0.10, 0.05)
    assert (J.red_blocked, J.red_hard_bounce, J.red_complaint) == (0.02, 0.05, 0.003)
    assert (J.min_delivered_for_complaints, J.patience_days, J.step_back_stages) == (1000, 10, 2)


@pytest.mark.parametrize(
    ("delivered", "colour"),
    [(89, "quiet"), (90, "green"), (100, "green")],  # 90 % of the cap is the fill
)
def test_fill_of_the_cap_decides_between_advance_and_hold(delivered, colour):
    assert judge(day(cap=100, sent=delivered, delivered=delivered), J).colour == colour


@pytest.mark.parametrize(("sent", "colour"), [(19, "quiet"), (20, "green")])
def test_fewer_than_min_sent_is_too_little_to_judge(sent, colour):
    assert judge(day(cap=20, sent=sent, delivered=sent), J).colour == colour


@pytest.mark.parametrize(
    ("cap", "sent", "blocked", "colour"),
    [(10, 9, 0, "quiet"), (10, 10, 0, "green"), (10, 10, 1, "red"), (0, 0, 0, "quiet")],
)
def test_a_cap_below_min_sent_is_judged_on_the_cap(cap, sent, blocked, colour):
    """Microsoft's half share of the first stages (10, 15) is under 20: judged on its cap, or
    it would hold at stage 1 for good (the simulated month found it)."""
    d = day(cap=cap, sent=sent, delivered=sent - blocked, blocked=blocked, refused=blocked)
    assert judge(d, J).colour == colour


def test_a_provider_past_the_last_stage_stays_there():
    p = decide(
        ev(
            day("google", cap=400, sent=400),
            day("yahoo", cap=200, sent=100),
            stages={"*": 2, "google": 4, "yahoo": 2},
        ),
        PLAN,
        J,
    )
    assert p.stages["google"] == 4 and p.verdict == "hold"  # not 5, 6, ... nor "advance"


@pytest.mark.parametrize(("deferred", "colour"), [(9, "green"), (10, "yellow")])
def test_rate_limited_deferrals_at_ten_percent_hold(deferred, colour):
    d = day(cap=90, sent=100, rate_limited=deferred, delivered=91)
    assert judge(d, J).colour == colour


@pytest.mark.parametrize(("deferred", "colour"), [(4, "green"), (5, "yellow")])
def test_reputation_deferrals_at_five_percent_hold(deferred, colour):
    d = day(cap=90, sent=100, reputation=deferred, delivered=95)
    assert judge(d, J).colour == colour


@pytest.mark.parametrize(("blocked", "colour"), [(1, "green"), (2, "red")])
def test_blocks_at_two_percent_are_red(blocked, colour):
    d = day(cap=90, sent=100, delivered=100 - blocked, blocked=blocked, refused=blocked)
    assert judge(d, J).colour == colour


@pytest.mark.parametrize(("bounced", "colour"), [(4, "green"), (5, "red")])
def test_hard_bounces_at_five_percent_of_answers_are_red(bounced, colour):
    d = day(cap=90, sent=100, delivered=100 - bounced, hard_bounced=bounced, refused=bounced)
    assert judge(d, J).colour == colour


@pytest.mark.parametrize(
    ("delivered", "complaints", "colour"),
    [
        (1000, 2, "green"),  # 0.2 %
        (1000, 3, "red"),  # 0.3 %: Google's line
        (999, 5, "green"),  # 0.5 %, but under 1,000 delivered: noise
        (1334, 4, "green"),  # 0.2999 %
        (1333, 4, "red"),  # 0.3001 %
    ],
)
def test_complaints_count_only_above_the_minimum_delivered(delivered, complaints, colour):
    d = day(cap=delivered, sent=delivered, delivered=delivered, complaints=complaints)
    assert judge(d, J).colour == colour


def test_green_providers_advance_and_a_yellow_one_holds_its_stage():
    p = decide(
        ev(
            day("google", cap=100, sent=100),
            day("microsoft", cap=50, sent=100, rate_limited=30, delivered=50),
        ),
        PLAN,
        J,
    )
    assert p.verdict == "advance"
    assert p.stages == {"*": 1, "google": 2, "microsoft": 1}
    assert "rate-limited 30 of 100" in p.held["microsoft"]


def test_one_red_provider_puts_the_whole_plan_in_review_and_nothing_rises():
    p = decide(
        ev(
            day("google", cap=100, sent=100),
            day("yahoo", cap=100, sent=100, blocked=5, refused=5, delivered=95),
            stages={"*": 2, "google": 2},
        ),
        PLAN,
        J,
    )
    assert p.verdict == "review"
    assert p.stages == {"*": 2, "google": 2}
    assert p.reasons == ["yahoo: 5 of 100 refused as blocked"]


def test_a_listed_ip_is_reviewed_whatever_it_sent():
    assert decide(ev(day(), listed=True), PLAN, J).verdict == "review"


def test_a_day_with_no_sends_is_not_a_sending_day():
    p = decide(ev(stages={"*": 3}), PLAN, J)
    assert (p.verdict, p.stages) == ("idle", {"*": 3})


@pytest.mark.parametrize(("since", "verdict"), [(9, "hold"), (10, "review")])
def test_patience_days_without_progress_ask_a_person(since, verdict):
    progressed = date.fromordinal(DAY.toordinal() - since)
    quiet = day(cap=100, sent=50, delivered=50)
    assert decide(ev(quiet, progressed=progressed), PLAN, J).verdict == verdict


def test_idle_days_also_run_out_of_patience():
    progressed = date.fromordinal(DAY.toordinal() - 10)
    assert decide(ev(progressed=progressed), PLAN, J).verdict == "review"


def test_every_provider_past_the_last_stage_proposes_completion():
    p = decide(
        ev(
            day("google", cap=400, sent=400),
            day("*", cap=400, sent=400),
            stages={"*": 3, "google": 3},
        ),
        PLAN,
        J,
    )
    assert (p.verdict, p.stages) == ("complete", {"*": 4, "google": 4})


def test_a_provider_first_seen_starts_at_the_stage_of_the_rest():
    p = decide(ev(day("apple", cap=200, sent=200), stages={"*": 2}), PLAN, J)
    assert p.stages == {"*": 2, "apple": 3}


# ---------------------------------------------------------------- the arithmetic
def test_caps_per_stage_and_provider_share():
    assert cap_for(PLAN, "microsoft", 1) == 50
    assert cap_for(PLAN, "microsoft", 2) == 200
    assert cap_for(PLAN, "google", 9) == 400  # past the end: the last stage holds
    assert day_caps(PLAN, {"*": 2, "google": 3}, ["google", "microsoft"]) == {
        "google": 400,
        "microsoft": 200,
        "*": 200,
    }


@pytest.mark.parametrize(
    ("hour", "allowed"), [(6, 0), (7, 10), (8, 20), (17, 110), (18, 120), (23, 120)]
)
def test_a_day_opens_hour_by_hour(hour, allowed):
    spread = Spread(first_hour=7, hours=12)
    assert opened(120, spread, datetime(2026, 12, 1, hour, 30, tzinfo=UTC)) == allowed


def test_the_shipped_plans_rise_and_name_their_source():
    for name, plan in RULES.spec.plans.items():
        assert plan.source, name
        assert plan.stages == sorted(plan.stages), name
    assert RULES.spec.plans["ses-45"].stages[-1] == 50000
    assert len(RULES.spec.plans["ses-45"].stages) == 45
    assert RULES.spec.plans["sendgrid"].stages[0] == 20 * 24  # day 0: 20 an hour
    assert RULES.spec.plans["standard"].stages[-1] == 57015  # Mailtrap's day 21
