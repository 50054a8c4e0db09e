"""protocol/warmup.py on a migrated database (SQLite and PostgreSQL): a start writes the plan and
its caps; the daily run judges each finished day from delivery events, per provider and per
sending day; red opens a review, step back lowers the caps; idle IPs go cold; a new sending
domain gets its own plan; status mirrors it all."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from itertools import count

import pytest
from sqlmodel import select

from models import (
    AuditEntry,
    DeliveryEvent,
    Domain,
    DomainState,
    IpAddress,
    IpPool,
    IpState,
    Tenant,
    WarmupDay,
    WarmupPlan,
)
from models.db import session_scope
from protocol import warmup
from protocol.errors import ServiceError
from runbooks.loader import ip_warmup

RULES = ip_warmup()
SANDBOX = RULES.spec.plans["sandbox"]  # 20, 30, 45, ...; microsoft half until stage 3
IP = "127.0.0.10"
START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
_ids = count(1)


@pytest.fixture
def engine(engine):
    with session_scope(engine) as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.flush()
        s.add(Domain(tenant_id=tenant.id, name="shop.example", state=DomainState.active))
        pool = IpPool(name="dedicated-acme")
        s.add(pool)
        s.flush()
        s.add(IpAddress(address=IP, pool_id=pool.id, ptr_name="mta10.axiom.test"))
        s.commit()
    return engine


def started(engine, plan="sandbox") -> int:
    with session_scope(engine) as s:
        result = warmup.start(
            s, IP, plan, RULES, reason="new", candidates="all", actor="test", now=START
        )
        s.commit()
    return result["plan_id"]


def events(engine, day: date, provider: str, n: int, category="delivered", permanent=False):
    at = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    with session_scope(engine) as s:
        for _ in range(n):
            s.add(
                DeliveryEvent(
                    at=at,
                    message_id=f"m{next(_ids)}",
                    recipient="r@x.test",
                    source_ip=IP,
                    provider=provider,
                    from_domain="shop.example",
                    category=category,
                    permanent=permanent,
                    attempt=1,
                )
            )
        s.commit()


def run_daily(engine, day: date) -> warmup.DailyReport:
    """The scheduled run just after midnight of `day`."""
    with session_scope(engine) as s:
        report = warmup.daily(
            s,
            RULES,
            now=datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(minutes=10),
            actor="test",
        )
        s.commit()
    return report


def plan_row(engine, plan_id) -> WarmupPlan:
    with session_scope(engine) as s:
        return s.get(WarmupPlan, plan_id)


def caps(engine, plan_id, day: date) -> dict[str, int]:
    with session_scope(engine) as s:
        rows = s.exec(select(WarmupDay).where(WarmupDay.plan_id == plan_id, WarmupDay.day == day))
        return {r.provider: r.cap for r in rows.all()}


def test_start_writes_a_running_plan_and_todays_caps_for_every_provider(engine):
    plan_id = started(engine)
    row = plan_row(engine, plan_id)
    assert (row.state, row.stages, row.schedule_id) == ("running", {"*": 1}, "sandbox")
    today = caps(engine, plan_id, START.date())
    assert today["*"] == 20 and today["google"] == 20 and today["microsoft"] == 10
    assert set(today) == {*RULES.spec.providers, "*"}
    with session_scope(engine) as s:
        assert s.exec(select(IpAddress)).one().state == IpState.warming
        assert s.exec(select(AuditEntry).where(AuditEntry.action == "warmup.start")).one()
    with session_scope(engine) as s:  # twice: one plan
        again = warmup.start(
            s, IP, "sandbox", RULES, reason="new", candidates="all", actor="t", now=START
        )
        assert again["already"] is True


def test_an_unknown_plan_or_ip_is_refused_by_name(engine):
    with session_scope(engine) as s, pytest.raises(ServiceError, match="'nope'"):
        warmup.start(s, IP, "nope", RULES, reason="new", candidates="all", actor="t", now=START)
    with session_scope(engine) as s, pytest.raises(ServiceError, match=r"192\.0\.2\.1"):
        warmup.start_evidence(s, "192.0.2.1", "sandbox", RULES)


def test_green_days_advance_per_provider_and_only_sending_days_count(engine):
    plan_id = started(engine)
    d1 = START.date()
    events(engine, d1, "google", 20)
    events(engine, d1, "microsoft", 8)  # its half share is a cap of 10: judged on 10, holds
    run_daily(engine, d1 + timedelta(days=1))
    row = plan_row(engine, plan_id)
    assert row.stages == {"*": 1, "google": 2, "microsoft": 1}
    assert "8 sent, fewer than 10" in row.held["microsoft"]
    assert caps(engine, plan_id, d1 + timedelta(days=1))["google"] == 30
    # two days without a message: no sending day, nothing moves (not calendar days)
    run_daily(engine, d1 + timedelta(days=3))
    assert plan_row(engine, plan_id).stages["google"] == 2
    events(engine, d1 + timedelta(days=3), "google", 30)
    run_daily(engine, d1 + timedelta(days=4))
    assert plan_row(engine, plan_id).stages["google"] == 3
    # running the same day again changes nothing
    run_daily(engine, d1 + timedelta(days=4))
    assert plan_row(engine, plan_id).stages["google"] == 3
    with session_scope(engine) as s:
        advanced = s.exec(select(AuditEntry).where(AuditEntry.action == "warmup.advance")).all()
        assert len(advanced) == 2


def test_rising_deferrals_hold_one_provider_while_another_advances(engine):
    plan_id = started(engine)
    d1 = START.date()
    events(engine, d1, "google", 20)
    events(engine, d1, "yahoo", 18)
    events(engine, d1, "yahoo", 4, category="rate_limited")
    run_daily(engine, d1 + timedelta(days=1))
    row = plan_row(engine, plan_id)
    assert row.stages["google"] == 2 and row.stages["yahoo"] == 1
    assert "rate-limited 4 of 22" in row.held["yahoo"]
    with session_scope(engine) as s:
        signals = (
            s.exec(select(WarmupDay).where(WarmupDay.day == d1, WarmupDay.provider == "yahoo"))
            .one()
            .signals
        )
    assert signals["colour"] == "yellow" and signals["rate_limited"] == 4


def test_blocks_put_the_plan_in_review_and_step_back_lowers_the_caps(engine):
    plan_id = started(engine)
    d = START.date()
    for n, volume in enumerate((20, 30, 45)):  # three green days: google at stage 4
        events(engine, d + timedelta(days=n), "google", volume)
        run_daily(engine, d + timedelta(days=n + 1))
    assert plan_row(engine, plan_id).stages["google"] == 4
    bad = d + timedelta(days=3)
    events(engine, bad, "google", 60)
    events(engine, bad, "google", 5, category="reputation", permanent=True)
    report = run_daily(engine, bad + timedelta(days=1))
    row = plan_row(engine, plan_id)
    assert row.state == "review" and row.stages["google"] == 4  # nothing rises
    assert [(f.action, f.plan_id) for f in report.follow_ups] == [("review", plan_id)]
    assert "5 of 65 refused as blocked" in report.follow_ups[0].reason
    # in review the daily run neither judges nor asks again; the caps stay
    again = run_daily(engine, bad + timedelta(days=2))
    assert again.follow_ups == [] and caps(engine, plan_id, bad + timedelta(days=2))["google"] == 65
    with session_scope(engine) as s:
        warmup.review(s, plan_id, "step_back", RULES, actor="bob", now=START + timedelta(days=5))
        s.commit()
    row = plan_row(engine, plan_id)
    assert row.state == "running" and row.stages["google"] == 2
    assert caps(engine, plan_id, (START + timedelta(days=5)).date())["google"] == 30


def test_pause_makes_every_cap_zero(engine):
    plan_id = started(engine)
    with session_scope(engine) as s:
        warmup.review(s, plan_id, "pause", RULES, actor="bob", now=START)
        s.commit()
    assert set(caps(engine, plan_id, START.date()).values()) == {0}


def test_the_last_stage_clean_asks_to_declare_the_ip_warm(engine):
    plan_id = started(engine)
    with session_scope(engine) as s:
        row = s.get(WarmupPlan, plan_id)
        row.stages = {"*": len(SANDBOX.stages), "google": len(SANDBOX.stages)}
        s.add(row)
        s.commit()
    events(engine, START.date(), "google", 200)
    events(engine, START.date(), "apple", 200)  # "*"
    report = run_daily(engine, START.date() + timedelta(days=1))
    assert [(f.action, f.ip) for f in report.follow_ups] == [("complete", IP)]
    with session_scope(engine) as s:
        warmup.declare_warm(s, IP, RULES, actor="bob", now=START, approved_by="bob")
        s.commit()
    assert plan_row(engine, plan_id).state == "done"
    with session_scope(engine) as s:
        assert s.exec(select(IpAddress)).one().state == IpState.active


def test_an_active_ip_idle_for_thirty_days_goes_cold_and_is_proposed_for_rewarm(engine):
    with session_scope(engine) as s:
        ip = s.exec(select(IpAddress)).one()
        ip.state = IpState.active
        ip.created_at = START - timedelta(days=90)
        s.add(ip)
        s.commit()
    events(engine, (START - timedelta(days=29)).date(), "google", 1)
    assert run_daily(engine, START.date()).cooled == []
    report = run_daily(engine, (START + timedelta(days=2)).date())
    assert report.cooled == [IP]
    assert [(f.action, f.plan, f.reason) for f in report.follow_ups] == [
        ("start", "rewarm", "idle")
    ]
    with session_scope(engine) as s:
        assert s.exec(select(IpAddress)).one().state == IpState.cold


def test_a_new_sending_domain_gets_its_own_plan_and_one_with_history_does_not(engine):
    with session_scope(engine) as s:
        made = warmup.start_domain(s, "shop.example", RULES, actor="t", now=START)
        s.commit()
    assert made is not None and made["caps"]["google"] == RULES.spec.plans["domain"].stages[0]
    with session_scope(engine) as s:  # again: one plan
        assert warmup.start_domain(s, "shop.example", RULES, actor="t", now=START) is None
        tenant = s.exec(select(Tenant)).one()
        s.add(Domain(tenant_id=tenant.id, name="old.example", state=DomainState.active))
        s.add(
            DeliveryEvent(
                at=START - timedelta(days=3),
                message_id="old",
                recipient="r@x.test",
                from_domain="old.example",
                category="delivered",
            )
        )
        s.commit()
    with session_scope(engine) as s:
        assert warmup.start_domain(s, "old.example", RULES, actor="t", now=START) is None


def test_status_shows_stage_cap_sent_signals_and_the_next_decision(engine):
    plan_id = started(engine)
    events(engine, START.date(), "google", 20)
    run_daily(engine, START.date() + timedelta(days=1))
    with session_scope(engine) as s:
        day = s.exec(
            select(WarmupDay).where(
                WarmupDay.plan_id == plan_id,
                WarmupDay.day == START.date() + timedelta(days=1),
                WarmupDay.provider == "google",
            )
        ).one()
        day.sent = 12
        s.add(day)
        s.commit()
    events(engine, START.date() + timedelta(days=1), "google", 12)
    with session_scope(engine) as s:
        rows = warmup.status(s, RULES, now=START + timedelta(days=1, hours=3))
    google = next(r for r in rows if r.provider == "google")
    assert (google.stage, google.cap, google.sent) == (2, 30, 12)
    assert google.signals.startswith("green: 20 delivered of 20")
    assert google.next.startswith("hold (12 sent, fewer than 20")
    with session_scope(engine) as s:
        lines = warmup.chart(warmup.history(s, plan_id)["google"]).splitlines()
    assert lines[0].endswith(" 20/20") and "░" not in lines[0]  # judged: what was delivered
    assert lines[1].endswith(" 12/30") and "█" in lines[1] and "░" in lines[1]  # in progress
