"""protocol/triage.signals_for: one subject's windows from the delivery events, raw and rolled
up, on SQLite and PostgreSQL, with time passed in; and the decision on what it reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
from sqlmodel import Session

from models import DeliveryEvent, IpPool, Stream, Tenant
from protocol import signals, triage
from protocol.triage import Subject, assess, signals_for, stream_subject, suspect
from runbooks.loader import degradation_triage
from runbooks.schema_protocol import EventsRetentionSpec

NOW = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)
RULES = degradation_triage().spec
PATH = Subject("ip-provider", provider="yahoo", ip="127.0.0.11")
OTHER_PATH = Subject("ip-provider", provider="google", ip="127.0.0.11")
DOMAIN = Subject("domain-provider", provider="yahoo", domain="acme.example")


def _events(engine, rows: list[dict]) -> None:
    base = {
        "kind": "attempt",
        "tenant_id": 1,
        "stream": "news",
        "from_domain": "acme.example",
        "message_id": "01Q",
        "recipient": "r@example.org",
        "attempt": 1,
        "source_ip": "127.0.0.11",
        "provider": "yahoo",
        "category": "delivered",
        "permanent": False,
    }
    with engine.begin() as conn:
        conn.execute(insert(DeliveryEvent), [base | r for r in rows])


@pytest.fixture
def world(engine):
    """acme's news stream (declared 1,000 a day) sends through 127.0.0.11. Every hour for 8
    days: 10 delivered at Yahoo and 2 at Google. In the last 10 minutes at Yahoo: 3 refused
    for a block list, 2 unknown mailboxes, 4 rate-limit deferrals, 1 asynchronous hard bounce,
    1 delayed-delivery notice (not a bounce) and 6 complaints; another tenant's mail from
    another domain shares the IP."""
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.add(Tenant(name="other"))
        s.add(IpPool(name="shared"))
        s.commit()
        s.add(Stream(tenant_id=1, name="news", pool_id=1, declared_per_day=1000))
        s.commit()
    rows = []
    for h in range(8 * 24):
        at = NOW - timedelta(hours=h, minutes=20)
        rows += [{"at": at}] * 10 + [{"at": at, "provider": "google"}] * 2
    at = NOW - timedelta(minutes=10)
    async_ = {"at": at, "kind": "bounce", "attempt": None}
    rows += (
        [{"at": at, "category": "blocklisted", "permanent": True}] * 3
        + [{"at": at, "category": "mailbox_unknown", "permanent": True}] * 2
        + [{"at": at, "category": "rate_limited"}] * 4
        + [async_ | {"category": "mailbox_disabled", "permanent": True}]
        + [async_ | {"category": "transient", "permanent": False}]
        + [{"at": at, "kind": "complaint", "category": "abuse", "attempt": None}] * 6
        + [{"at": at, "tenant_id": 2, "stream": "bulk", "from_domain": "other.example"}] * 5
    )
    _events(engine, rows)
    return engine


def _sent(window) -> tuple:
    return (window.sent, window.delivered, window.answered, window.complaints)


def test_each_window_counts_the_subject_s_events_only(world):
    s = signals_for(world, PATH, NOW)
    assert (s.subject, s.end, s.after, s.declared_per_day) == (PATH, NOW, None, None)
    last = s.windows["15m"]
    # 9 attempts of acme (3 + 2 refused, 4 deferred) and other's 5 delivered share the path.
    assert _sent(last) == (14, 5, 10, 6)
    assert last.refused == {"blocklisted": 3, "mailbox_unknown": 2}
    assert last.deferred == {"rate_limited": 4}
    assert last.bounced == {"mailbox_disabled": 1}  # the delayed-delivery notice is not one
    assert (last.start, last.end) == (NOW - timedelta(minutes=15), NOW)
    assert _sent(s.windows["1h"]) == (24, 15, 20, 6)  # plus the hourly 10 at -20 min
    assert s.windows["24h"].delivered == 24 * 10 + 5
    assert s.windows["7d"].delivered == 7 * 24 * 10 + 5
    google = signals_for(world, OTHER_PATH, NOW)
    assert _sent(google.windows["24h"]) == (48, 48, 48, 0)


def test_a_domain_and_a_stream_read_their_own_mail(world):
    domain = signals_for(world, DOMAIN, NOW).windows["1h"]
    assert _sent(domain) == (19, 10, 15, 6)  # not other.example's 5
    news = stream_subject(world, "acme", "news")
    assert news == Subject("stream", tenant_id=1, stream="news", tenant="acme")
    assert news.label == "stream:acme/news"
    s = signals_for(world, news, NOW)
    assert s.declared_per_day == 1000
    assert _sent(s.windows["1h"]) == (21, 12, 17, 6)  # at Yahoo and Google
    with pytest.raises(ValueError, match="no tenant 'nobody'"):
        stream_subject(world, "nobody", "news")


def test_the_rolled_up_hours_answer_what_the_raw_events_did(world):
    subjects = [PATH, OTHER_PATH, DOMAIN, stream_subject(world, "acme", "news")]
    before = [signals_for(world, s, NOW) for s in subjects]
    spec = EventsRetentionSpec(raw_days=2, rollup_days=30, hours_per_run=500, delete_batch=1000)
    done = signals.roll_up_and_expire(world, spec, NOW, actor="test")
    assert done.raw_deleted > 0 and done.rolled_until == NOW.replace(minute=0)
    after = [signals_for(world, s, NOW) for s in subjects]
    assert after == before
    # An hour on, the edges of every window move through raw and rolled-up hours alike.
    again = signals_for(world, PATH, NOW + timedelta(hours=1))
    assert again.windows["7d"].delivered == 7 * 24 * 10 - 10 + 5  # the oldest hour left
    assert again.windows["24h"].delivered == 23 * 10 + 5
    assert again.windows["1h"].delivered == 0


def test_since_reads_the_counts_from_the_end_of_the_last_action(world):
    since = NOW - timedelta(minutes=5)  # after the last burst at -10 min
    s = signals_for(world, PATH, NOW, since)
    assert s.after is not None and (s.after.start, s.after.end) == (since, NOW)
    assert _sent(s.after) == (0, 0, 0, 0)
    earlier = signals_for(world, PATH, NOW, NOW - timedelta(minutes=30))
    assert _sent(earlier.after) == (24, 15, 20, 6)
    # An action that ended before the longest window changes none of them.
    assert signals_for(world, PATH, NOW, NOW - timedelta(days=2)).after is None


def test_the_decision_on_what_was_read(world):
    news = stream_subject(world, "acme", "news")
    s = signals_for(world, news, NOW)
    findings = assess(s, RULES, NOW)
    # 6 complaints over 12 delivered: far over, but under 200 sends in the hour, and 6 < 10
    # complaints over the day: noise at this volume. The rate-limit deferrals (4 of 21) are
    # under the 15 min window's 50 sends.
    assert findings == []
    # A burst the size of the reference point: 250 delivered and 5 complaints in the hour.
    at = NOW - timedelta(minutes=2)
    _events(world, [{"at": at}] * 250 + [{"at": at, "kind": "complaint", "category": "abuse"}] * 5)
    s = signals_for(world, news, NOW)
    findings = assess(s, RULES, NOW)
    assert [(f.signal, f.level, f.window) for f in findings] == [("complaint", "act", "1h")]
    cause = suspect(findings, news, RULES)
    assert (cause.name, cause.severity) == ("content", "critical")
    assert triage.propose(cause, RULES).name == "pause_stream"
    # Once the stream is released 1 minute ago, the windows start again: nothing since.
    since = NOW - timedelta(minutes=1)
    assert assess(signals_for(world, news, NOW, since), RULES, NOW, since) == []
