"""Signals per window and subject, the hourly roll-up and retention (protocol/signals.py), on
SQLite and PostgreSQL, with time passed in: days of history in a few seconds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, insert, select
from sqlmodel import Session

from models import AuditEntry, DeliveryEvent, EventRollup, HoldTally, Tenant
from protocol import signals
from runbooks.loader import events_retention
from runbooks.schema_protocol import EventsRetentionSpec

NOW = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)


def _events(engine, rows: list[dict]) -> None:
    base = {
        "kind": "attempt",
        "tenant_id": 1,
        "stream": "transactional",
        "from_domain": "acme.example",
        "message_id": "01Q",
        "recipient": "r@example.org",
        "attempt": 1,
        "source_ip": "127.0.0.10",
        "provider": "google",
        "category": "delivered",
        "permanent": False,
    }
    with engine.begin() as conn:
        conn.execute(insert(DeliveryEvent), [base | r for r in rows])


@pytest.fixture
def history(engine):
    """Eight days of traffic: each hour 4 delivered and 1 deferred via 127.0.0.10 to Google,
    and in the last 2 hours 2 refusals (one unknown mailbox, one policy) via 127.0.0.11 to
    Yahoo, one asynchronous bounce and one complaint for acme.example's marketing stream."""
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.commit()
    rows = []
    for h in range(8 * 24):
        at = NOW - timedelta(hours=h, minutes=10)
        rows += [{"at": at}] * 4 + [{"at": at, "category": "rate_limited"}]
    for h in range(2):
        at = NOW - timedelta(hours=h, minutes=5)
        yahoo = {"at": at, "source_ip": "127.0.0.11", "provider": "yahoo", "stream": "marketing"}
        rows += [
            yahoo | {"category": "mailbox_unknown", "permanent": True},
            yahoo | {"category": "policy", "permanent": True},
        ]
    at = NOW - timedelta(minutes=3)
    rows += [
        {"at": at, "kind": "bounce", "category": "mailbox_unknown", "permanent": True,
         "stream": "marketing", "attempt": None, "source_ip": None, "provider": None},
        {"at": at, "kind": "complaint", "category": "complaint", "stream": "marketing",
         "attempt": None, "source_ip": None, "provider": None},
    ]  # fmt: skip
    _events(engine, rows)
    return engine


def _by(stats) -> dict:
    return {s.subject: s for s in stats.subjects}


def test_window_counts_and_rates_per_subject_from_raw_events(history):
    last_hour = _by(signals.window_stats(history, "ip", "1h", NOW))
    google = last_hour["127.0.0.10"]
    # The hour before NOW holds one hourly batch (at -10 min): 4 delivered, 1 deferred.
    assert (google.sent, google.delivered, google.deferred, google.refused) == (5, 4, 1, {})
    yahoo = last_hour["127.0.0.11"]
    assert yahoo.refused == {"mailbox_unknown": 1, "policy": 1} and yahoo.delivered == 0
    stream = _by(signals.window_stats(history, "stream", "24h", NOW))["acme/marketing"]
    assert (stream.sent, stream.refused_total, stream.bounced, stream.complaints) == (4, 4, 1, 1)
    assert stream.bounce_rate == 1.25  # (4 refused + 1 async bounce) / (0 delivered + 4)
    assert stream.complaint_rate == 0.0  # no delivery to rate it against
    transactional = _by(signals.window_stats(history, "stream", "24h", NOW))["acme/transactional"]
    assert (transactional.sent, transactional.delivered) == (24 * 5, 24 * 4)
    day = _by(signals.window_stats(history, "provider", "24h", NOW))
    assert day["google"].sent == 24 * 5 and day["yahoo"].sent == 4
    # The complaint and the bounce carry no IP: they count under "(none)" per IP.
    assert _by(signals.window_stats(history, "ip", "15m", NOW))["(none)"].complaints == 1
    week = _by(signals.window_stats(history, "domain", "7d", NOW))["acme.example"]
    assert week.sent == 7 * 24 * 5 + 4


def test_rolled_up_hours_give_the_same_counts_and_raw_events_past_retention_go(history):
    windows = ["15m", "1h", "24h", "7d"]
    before = {
        (by, w): signals.window_stats(history, by, w, NOW).as_json()["subjects"]
        for by in signals.SUBJECTS
        for w in windows
    }
    spec = EventsRetentionSpec(raw_days=2, rollup_days=30, hours_per_run=500, delete_batch=1000)
    done = signals.roll_up_and_expire(history, spec, NOW, actor="test")
    # The first event is 191 h 10 min before NOW (12:30): hours 13:00 eight days ago to 12:00.
    assert done.hours_rolled == 191
    assert done.rolled_until == NOW.replace(minute=0)
    assert done.raw_deleted == 144 * 5  # the hourly batches 48 h 10 min and more before NOW
    hours = signals.rollup_hours(history)
    assert sum(hours.values()) == 966 - 9  # all but the current hour's 5 + 2 + 2
    after = {
        (by, w): signals.window_stats(history, by, w, NOW).as_json()["subjects"]
        for by in signals.SUBJECTS
        for w in windows
    }
    assert after == before  # the roll-up answers what the raw events did
    with Session(history) as s:
        [entry] = (
            s.execute(select(AuditEntry).where(AuditEntry.action == "events.expire"))
            .scalars()
            .all()
        )
    assert entry.evidence["raw_deleted"] == done.raw_deleted and entry.actor == "test"
    # Run again in the same hour: nothing to roll, nothing to delete, nothing audited.
    again = signals.roll_up_and_expire(history, spec, NOW, actor="test")
    assert again.idle and again.rolled_until == done.rolled_until


def test_the_roll_up_is_bounded_per_run_and_catches_up(history):
    spec = EventsRetentionSpec(raw_days=30, rollup_days=30, hours_per_run=24, delete_batch=1000)
    runs = []
    while True:
        done = signals.roll_up_and_expire(history, spec, NOW, actor="test")
        if done.hours_rolled == 0:
            break
        runs.append(done.hours_rolled)
        assert len(runs) < 20
    assert runs == [24] * 7 + [23]
    assert sum(signals.rollup_hours(history).values()) == 966 - 9
    with Session(history) as s:
        assert s.execute(select(func.count()).select_from(DeliveryEvent)).scalar_one() == 966
    # 40 days on, every raw event is past raw_days once its hour is rolled up, and every
    # roll-up past rollup_days.
    later = NOW + timedelta(days=40)
    done = signals.roll_up_and_expire(history, spec, later, actor="test")
    assert done.hours_rolled == 24 and done.raw_deleted == 966
    with Session(history) as s:
        assert s.execute(select(func.count()).select_from(EventRollup)).scalar_one() == 0


def test_held_mail_shows_per_stream_and_reason(engine):
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.add(
            HoldTally(
                interval_start=NOW - timedelta(minutes=10),
                reason="capped",
                tenant_id=1,
                stream="transactional",
                provider="yahoo",
                count=7,
            )
        )
        s.commit()
    [acme] = signals.window_stats(engine, "stream", "1h", NOW).subjects
    assert (acme.subject, acme.held, acme.sent) == ("acme/transactional", {"capped": 7}, 0)
    [yahoo] = signals.window_stats(engine, "provider", "15m", NOW).subjects
    assert yahoo.held == {"capped": 7}


def test_unknown_window_and_subject_are_refused_by_name(engine):
    with pytest.raises(ValueError, match="'2h': the window is one of 15m, 1h, 24h, 7d"):
        signals.window_stats(engine, "ip", "2h", NOW)
    with pytest.raises(ValueError, match="'asn': group by one of provider, ip, domain, stream"):
        signals.window_stats(engine, "asn", "1h", NOW)


def test_the_retention_runbook_loads_with_its_sources():
    rules = events_retention()
    assert rules.spec.raw_days <= rules.spec.rollup_days
    assert rules.schedule.cron and rules.sources


def test_axiom_stats_shows_a_table_and_json_and_names_a_bad_option(cli):
    from models.db import make_engine

    engine = make_engine(cli.home.db_url)
    now = datetime.now(UTC)
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.commit()
    _events(
        engine,
        [{"at": now - timedelta(minutes=5)}] * 3
        + [{"at": now - timedelta(minutes=5), "category": "policy", "permanent": True}]
        + [{"at": now - timedelta(hours=2)}],  # outside the hour; rolled up below
    )
    engine.dispose()
    data = json.loads(cli("stats", "--by", "stream", "--window", "1h", "--json").stdout)
    assert (data["by"], data["window"]) == ("stream", "1h")
    [acme] = data["subjects"]
    assert acme["subject"] == "acme/transactional"
    assert (acme["sent"], acme["delivered"], acme["refused_by_category"]) == (4, 3, {"policy": 1})
    assert acme["bounce_rate"] == 0.25
    table = cli("stats", "--by", "provider").stdout
    assert "google" in table and "20.00%" in table  # 1 refused of 5 in 24 h
    assert "Refused by category" in table and "policy" in table
    bad = cli("stats", "--window", "2h")
    assert bad.exit_code == 2 and "--window '2h': one of 15m, 1h, 24h, 7d" in bad.stderr
    bad = cli("stats", "--by", "asn")
    assert bad.exit_code == 2 and "--by 'asn': one of provider, ip, domain, stream" in bad.stderr
    rolled = json.loads(cli("stats", "roll-up", "--json").stdout)
    assert rolled["hours_rolled"] == 2 and rolled["raw_deleted"] == 0
