"""The sandbox clock (config/clock.py, models/sandbox_clock.py) and `axiom sandbox reset`'s
relay side (sandbox/reset.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlmodel import Session, select

from config.clock import OffsetClock, SystemClock, parse_duration
from models import AuditEntry, Message, Recipient, RecipientState, Suspension, Tenant
from models.audit import as_utc
from models.sandbox_clock import clock_for, read_offset, set_offset
from sandbox.behaviour import behaviour
from sandbox.reputation import Reputation
from sandbox.reset import reset_relay


def test_production_runs_on_the_system_clock_whatever_the_table_says(engine):
    set_offset(engine, 86400)
    assert isinstance(clock_for("production", engine), SystemClock)
    sandbox = clock_for("sandbox", engine)
    ahead = sandbox.now() - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < ahead <= timedelta(days=1)


def test_the_offset_is_read_at_most_once_a_second(monkeypatch):
    reads = []
    clock = OffsetClock(lambda: reads.append(1) or 3600.0)
    moment = [100.0]
    monkeypatch.setattr("config.clock.time", SimpleNamespace(monotonic=lambda: moment[0]))
    first = clock.now()
    assert len(reads) == 1 and first - datetime.now(UTC) > timedelta(minutes=59)
    for moment[0] in (100.2, 100.9):
        clock.now()  # within the second: no read
    assert len(reads) == 1
    moment[0] = 101.0
    clock.now()  # a second later: read again
    assert len(reads) == 2


def test_a_failed_read_keeps_the_last_offset():
    answers = iter([120.0])

    def read() -> float:
        return next(answers)  # StopIteration the second time: "database unreachable"

    clock = OffsetClock(read, every=0.0)
    clock.refresh()
    clock.refresh()
    assert clock.offset_seconds == 120.0


def test_a_followed_clock_never_reads_on_the_caller(monkeypatch):
    async def main() -> tuple[int, int]:
        reads = []
        clock = OffsetClock(lambda: reads.append(1) or 60.0, every=0.05)
        task = asyncio.create_task(clock.follow())
        await asyncio.sleep(0.12)
        before = len(reads)
        for _ in range(1000):
            clock.now()
        task.cancel()
        return before, len(reads)

    before, after = asyncio.run(main())
    assert before >= 2 and after == before


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("3h", 10800), ("1d", 86400), ("2w", 1209600)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "1y", "nan", "one day"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_reputations_drift_back_toward_cold_as_days_pass():
    """Idle days past the grace halve a warm IP's history; a damaged one recovers daily."""
    now = [1_000_000.0]
    model = behaviour().reputation
    rep = Reputation(model, lambda: now[0])
    rep.set_score(["yahoo"], "127.0.0.10", 80)
    rep.set_score(["yahoo"], "127.0.0.11", -40)
    now[0] += 7 * 86400
    rep.age()
    # 6 whole idle days since the day it was set; the first idle_grace_days cost nothing
    charged = 6 - model.daily.idle_grace_days
    keep = 0.5 ** (charged / model.daily.idle_half_life_days)
    assert rep.row("yahoo", "127.0.0.10").score == pytest.approx(80 * keep, abs=0.01)
    assert rep.row("yahoo", "127.0.0.11").score == pytest.approx(-40 + 7 * model.decay_per_day)
    now[0] += 60 * 86400  # never past the initial score; a month idle is as good as cold
    assert 0 <= rep.row("yahoo", "127.0.0.10").score - model.initial_score < 1
    assert rep.row("yahoo", "127.0.0.11").score == model.initial_score


def _recipient(session, tenant_id, n, *, next_at, reply):
    session.add(
        Message(
            id=f"Q{n:025d}",
            tenant_id=tenant_id,
            mail_from="a@demo.example",
            header_from_domain="demo.example",
            size=1,
            data=b"x",
        )
    )
    session.flush()
    r = Recipient(
        message_id=f"Q{n:025d}",
        address=f"r{n}@gmail.com",
        domain="gmail.com",
        state=RecipientState.queued,
        next_attempt_at=next_at,
        last_reply=reply,
    )
    session.add(r)
    return r


def test_reset_lifts_suspensions_wakes_held_mail_and_returns_time(engine):
    now = datetime.now(UTC)
    set_offset(engine, 86400)  # a day ahead: what was set then lies a day in the future
    ahead = now + timedelta(days=1)
    with Session(engine) as s:
        tenant = Tenant(name="demo")
        s.add(tenant)
        s.flush()
        s.add(
            Suspension(
                source_ip="127.0.0.1",
                provider="google",
                action="suspend",
                reason="test",
                rule_id="google-unusual-rate",
                expires_at=ahead + timedelta(hours=2),
            )
        )
        s.add(
            Suspension(
                source_ip="127.0.0.1",
                provider="yahoo",
                action="throttle",
                limit_per_minute=5,
                reason="old",
                expires_at=now - timedelta(hours=1),  # over already: left alone
            )
        )
        held = _recipient(
            s,
            tenant.id,
            1,
            next_at=ahead + timedelta(hours=2),
            reply="waiting: 127.0.0.1 suspended for google until 12:00:00Z",
        )
        deferred = _recipient(
            s, tenant.id, 2, next_at=ahead + timedelta(minutes=5), reply="451 4.7.28 later"
        )
        s.commit()
        held_id, deferred_id = held.id, deferred.id
    result = reset_relay(engine, now)
    assert read_offset(engine) == 0.0 and result.offset_was == 86400
    assert [(x["ip"], x["provider"]) for x in result.suspensions_lifted] == [
        ("127.0.0.1", "google")
    ]
    assert result.woken == 1 and result.retries_moved == 1
    with Session(engine) as s:
        active = s.exec(select(Suspension).where(Suspension.expires_at > now)).all()
        assert active == []
        assert as_utc(s.get(Recipient, held_id).next_attempt_at) == now
        # the deferral keeps the five minutes it had left
        left = as_utc(s.get(Recipient, deferred_id).next_attempt_at) - now
        assert timedelta(minutes=4, seconds=59) < left <= timedelta(minutes=5, seconds=1)
        audit = s.exec(select(AuditEntry)).all()
    lift = [a for a in audit if a.action == "suspension.lift"]
    assert [(a.actor, a.subject, a.evidence["reason"]) for a in lift] == [
        ("cli", "path:127.0.0.1/google", "sandbox reset")
    ]
    assert any(a.action == "sandbox.reset" for a in audit)
    # a second reset finds nothing to do and writes nothing
    again = reset_relay(engine, datetime.now(UTC))
    assert (again.suspensions_lifted, again.woken, again.offset_was) == ([], 0, 0.0)
    with Session(engine) as s:
        assert len(s.exec(select(AuditEntry)).all()) == len(audit)
