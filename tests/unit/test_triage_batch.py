"""protocol/triage.signals_for_all: every subject's signals in a few grouped queries per kind
of subject, equal to what signals_for reads for each one and to counts made here from the
events themselves. Random event sets (seeded, so a failure replays) with events on the
windows' and hours' edges, before any roll-up, with part of the hours rolled up and with all
of them; on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, insert
from sqlmodel import Session

from models import DeliveryEvent, IpPool, Stream, Tenant
from models.audit import as_utc
from models.db import session_scope
from protocol import signals, triage
from protocol.triage import Subject, Window, signals_for, signals_for_all
from runbooks.loader import degradation_triage
from runbooks.schema_protocol import EventsRetentionSpec

BASE = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)  # on the hour
# Read on the hour, inside an hour, and two days earlier (events after it must not count).
NOWS = (
    BASE,
    BASE - timedelta(minutes=37, seconds=12, microseconds=500),
    BASE - timedelta(days=2, minutes=5),
)
IPS = ("127.0.0.11", "127.0.0.12", "127.0.0.13", None)
PROVIDERS = ("yahoo", "google", "microsoft", None)
DOMAINS = ("a.example", "b.example", "c.example", None)
STREAMS = ((1, "news"), (1, "alerts"), (2, "bulk"), (None, None))
DECLARED = {(1, "news"): 1000, (2, "bulk"): 500}  # alerts declared nothing
OUTCOMES = (  # (kind, category, permanent), the first the most frequent
    ("attempt", "delivered", False),
    ("attempt", "delivered", False),
    ("attempt", "delivered", False),
    ("attempt", "rate_limited", False),
    ("attempt", "mailbox_unknown", True),
    ("attempt", "blocklisted", True),
    ("bounce", "mailbox_disabled", True),
    ("bounce", "transient", False),  # a delayed-delivery notice: not a bounce
    ("complaint", "abuse", False),
)
SUBJECTS = (
    [Subject("ip-provider", provider=p, ip=ip) for ip in IPS for p in PROVIDERS]
    + [Subject("domain-provider", provider=p, domain=d) for d in DOMAINS for p in PROVIDERS]
    + [Subject("stream", tenant_id=t, stream=s, tenant=None) for t, s in STREAMS]
    + [Subject("stream", tenant_id=3, stream="silent")]  # no mail at all
)
RULES = degradation_triage()


def _moments(rng: random.Random) -> list[datetime]:
    """Random moments over the 8 days and a half before BASE, and every edge a window or an
    hour has at the NOWS, a microsecond either side of it too."""
    span = int(timedelta(days=8, hours=12).total_seconds() * 1e6)
    out = [BASE - timedelta(microseconds=rng.randrange(span)) for _ in range(1200)]
    for now in NOWS:
        for seconds in (*signals.WINDOWS.values(), 0, 600, 3 * 3600):
            edge = now - timedelta(seconds=seconds)
            for moment in (edge, triage._floor_hour(edge), triage._ceil_hour(edge)):
                out += [
                    moment,
                    moment - timedelta(microseconds=1),
                    moment + timedelta(microseconds=1),
                ]
    return out


def _events(rng: random.Random) -> list[dict]:
    rows = []
    for n, at in enumerate(_moments(rng)):
        kind, category, permanent = rng.choice(OUTCOMES)
        tenant_id, stream = rng.choice(STREAMS)
        rows.append(
            {
                "at": at,
                "kind": kind,
                "tenant_id": tenant_id,
                "stream": stream,
                "from_domain": rng.choice(DOMAINS),
                "message_id": f"m{n}",
                "recipient": f"r{n}@example.org",
                "attempt": 1 if kind == "attempt" else None,
                "source_ip": rng.choice(IPS),
                "provider": rng.choice(PROVIDERS),
                "category": category,
                "permanent": permanent,
            }
        )
    return rows


def _matches(subject: Subject, row: dict) -> bool:
    if subject.kind == "ip-provider":
        return (row["source_ip"], row["provider"]) == (subject.ip, subject.provider)
    if subject.kind == "domain-provider":
        return (row["from_domain"], row["provider"]) == (subject.domain, subject.provider)
    return (row["tenant_id"], row["stream"]) == (subject.tenant_id, subject.stream)


def _expected(rows: list[dict], subject: Subject, start: datetime, end: datetime) -> Window:
    """The window counted here from the events: attempts are sent (delivered, or refused and
    deferred by category), permanent asynchronous bounces are bounced, complaints complaints."""
    sent = delivered = complaints = 0
    deferred: dict[str, int] = {}
    refused: dict[str, int] = {}
    bounced: dict[str, int] = {}
    for row in rows:
        if not (start <= row["at"] < end and _matches(subject, row)):
            continue
        category = row["category"]
        if row["kind"] == "complaint":
            complaints += 1
        elif row["kind"] == "bounce":
            if row["permanent"]:
                bounced[category] = bounced.get(category, 0) + 1
        else:
            sent += 1
            if category == "delivered":
                delivered += 1
            else:
                into = refused if row["permanent"] else deferred
                into[category] = into.get(category, 0) + 1
    return Window(start, end, sent, delivered, deferred, refused, bounced, complaints)


def _since(rng: random.Random, now: datetime) -> dict[Subject, datetime]:
    """Ends of actions for about half the subjects: inside the day, on a window's start, at
    now, and before the day (no `after`)."""
    choices = (
        timedelta(minutes=10),
        timedelta(hours=1),
        timedelta(hours=3),
        timedelta(hours=24),
        timedelta(hours=24) - timedelta(microseconds=1),
        timedelta(0),
        timedelta(days=2),
        timedelta(hours=5, minutes=13, seconds=7),
    )
    return {s: now - rng.choice(choices) for s in SUBJECTS if rng.random() < 0.5}


def _check(engine, rows: list[dict], now: datetime, since: dict[Subject, datetime]) -> int:
    """signals_for_all over every subject (one read of the whole kind), over a few (their
    rows only), and signals_for one by one: all equal to the counts made here."""
    every = signals_for_all(engine, SUBJECTS, now, since)
    few = signals_for_all(engine, SUBJECTS[:3] + SUBJECTS[-3:], now, since)
    assert set(every) == set(SUBJECTS) and set(few) == set(SUBJECTS[:3] + SUBJECTS[-3:])
    counted = 0
    for subject in SUBJECTS:
        got = every[subject]
        expected = {
            name: _expected(rows, subject, now - timedelta(seconds=signals.WINDOWS[name]), now)
            for name in ("15m", "1h", "24h", "7d")
        }
        assert (got.subject, got.end) == (subject, now)
        assert dict(got.windows) == expected, subject.label
        end = since.get(subject)
        if end is not None and now - timedelta(days=1) < end <= now:
            assert got.after == _expected(rows, subject, end, now), subject.label
        else:
            assert got.after is None
        declared = DECLARED.get((subject.tenant_id, subject.stream))
        assert got.declared_per_day == declared
        # The hour of its first event in the week.
        week = [
            as_utc(r["at"])
            for r in rows
            if now - timedelta(days=7) <= as_utc(r["at"]) < now and _matches(subject, r)
        ]
        if not week:
            assert got.first_seen is None, subject.label
        else:
            first = min(week)
            hour = first.replace(minute=0, second=0, microsecond=0)
            assert got.first_seen == hour, (subject.label, got.first_seen, first)
        assert signals_for(engine, subject, now, end) == got, subject.label
        if subject in few:
            assert few[subject] == got, subject.label
        counted += got.windows["7d"].sent
    return counted


@pytest.fixture(params=[1, 2])
def world(request, engine):
    rng = random.Random(request.param)
    with Session(engine) as s:
        s.add_all([Tenant(name="acme"), Tenant(name="other"), Tenant(name="quiet")])
        s.add(IpPool(name="shared"))
        s.commit()
        s.add(Stream(tenant_id=1, name="news", pool_id=1, declared_per_day=1000))
        s.add(Stream(tenant_id=1, name="alerts", pool_id=1))
        s.add(Stream(tenant_id=2, name="bulk", pool_id=1, declared_per_day=500))
        s.commit()
    rows = _events(rng)
    with engine.begin() as conn:
        conn.execute(insert(DeliveryEvent), rows)
    return engine, rows, rng


def test_every_subject_reads_what_signals_for_and_the_events_say(world):
    engine, rows, rng = world
    spec = EventsRetentionSpec(raw_days=30, rollup_days=400, hours_per_run=500, delete_batch=1000)
    sent = 0
    # Before any roll-up; rolled up to 3 days before BASE (the NOWS' windows straddle it);
    # every completed hour rolled up.
    for rolled_to in (None, BASE - timedelta(days=3, minutes=20), BASE + timedelta(minutes=1)):
        if rolled_to is not None:
            done = signals.roll_up_and_expire(engine, spec, rolled_to, actor="test")
            assert done.hours_rolled > 0 and done.raw_deleted == 0
        for now in NOWS:
            sent += _check(engine, rows, now, _since(rng, now))
    assert sent > 1000  # the windows held mail: the equality was not of empty windows


def test_more_ends_of_actions_than_one_statement_takes(world, monkeypatch):
    """With more distinct `since` than MAX_STARTS, the starts go over several statements."""
    engine, rows, _ = world
    monkeypatch.setattr(triage, "MAX_STARTS", 3)
    spec = EventsRetentionSpec(raw_days=30, rollup_days=400, hours_per_run=500, delete_batch=1000)
    signals.roll_up_and_expire(engine, spec, BASE, actor="test")
    now = NOWS[1]
    since = {s: now - timedelta(minutes=7 * i + 1) for i, s in enumerate(SUBJECTS)}
    _check(engine, rows, now, since)


def test_the_number_of_queries_does_not_grow_with_the_subjects(world):
    engine, _, rng = world
    spec = EventsRetentionSpec(raw_days=30, rollup_days=400, hours_per_run=500, delete_batch=1000)
    signals.roll_up_and_expire(engine, spec, BASE, actor="test")
    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    now = NOWS[1]
    event.listen(engine, "before_cursor_execute", count)
    try:
        read = signals_for_all(engine, SUBJECTS, now, _since(rng, now))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(read) == len(SUBJECTS) == 37
    queries = [s for s in statements if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    # The roll-up's cursor; per kind one over the stretches of raw events the windows read;
    # one over event_rollup for both kinds of pair on SQLite (one each on PostgreSQL) and one
    # over event_rollup_subject for the streams; the streams' declared volumes.
    pairs = 1 if engine.dialect.name == "sqlite" else 2
    assert len(queries) == 1 + 3 + pairs + 1 + 1, queries


def test_detect_reads_the_windows_from_the_end_of_the_last_action(engine):
    """A stream's complaint burst half an hour ago opens an incident; with its subjects'
    actions ended 10 minutes ago (`since`), nothing since then reaches the minimums."""
    now = BASE
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.commit()
    burst = [
        {
            "at": now - timedelta(minutes=30),
            "kind": "complaint" if n >= 400 else "attempt",
            "tenant_id": 1,
            "stream": "news",
            "from_domain": "news.example",
            "message_id": f"m{n}",
            "recipient": f"r{n}@yahoo.com",
            "source_ip": "127.0.0.10",
            "provider": "yahoo",
            "category": "complaint" if n >= 400 else "delivered",
        }
        for n in range(400 + 20)
    ]
    with engine.begin() as conn:
        conn.execute(insert(DeliveryEvent), burst)
    wanted = triage.subjects_with_mail(engine, now)
    assert len(wanted) == 3

    def cycle(since):
        with session_scope(engine) as s:
            report = triage.detect(
                s,
                RULES.spec,
                now=now,
                actor="test",
                runbook=(RULES.id, RULES.version),
                since=since,
            )
            s.commit()
        return report

    quiet = cycle({subject: now - timedelta(minutes=10) for subject in wanted})
    assert (quiet.subjects, quiet.causes, quiet.incidents) == (3, [], [])
    loud = cycle(None)
    assert loud.subjects == 3 and len(loud.incidents) == 3
    assert {c["subject"] for c in loud.causes} == {s.label for s in wanted}
    # An action that ended before the day changes nothing: the same incidents, folded.
    again = cycle({subject: now - timedelta(days=2) for subject in wanted})
    assert sorted(again.incidents) == sorted(loud.incidents)
