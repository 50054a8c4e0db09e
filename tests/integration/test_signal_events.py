"""Every delivery outcome is an event with its tenant, stream and From domain, and every
decision not to send now is counted in the hold tally, against real receivers (smtp-sink) and
a real DNS server (Knot), with the delivery engine on a manual clock."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlmodel import Session

from models import (
    HoldTally,
    IpAddress,
    IpPool,
    Stream,
    Suspension,
    Tenant,
    WarmupDay,
    WarmupPlan,
)
from models.egress import HOLD_POOL
from relay.spool.claims import interval_start
from testbed.dns import knot  # noqa: F401  (fixture)
from tests.integration.delivery_world import make_world

pytestmark = pytest.mark.integration


@pytest.fixture
def world(engine, knot):  # noqa: F811
    w = make_world(engine, knot)
    yield w
    w.stop()


def _tally(world) -> dict[tuple[str, str, str, str], int]:
    """(reason, stream, provider, source IP) -> count, over every interval."""
    with Session(world.engine) as s:
        rows = s.exec(select(HoldTally)).scalars().all()
    out: dict = {}
    for r in rows:
        assert r.tenant_id == world.tenant_id
        key = (r.reason, r.stream, r.provider, r.source_ip)
        out[key] = out.get(key, 0) + r.count
    return out


def _suspend(world, provider: str, ips=("127.0.0.10", "127.0.0.11"), **kw) -> None:
    now = world.clock.now()
    with Session(world.engine) as s:
        for ip in ips:
            s.add(
                Suspension(
                    source_ip=ip,
                    provider=provider,
                    action=kw.get("action", "suspend"),
                    limit_per_minute=kw.get("limit"),
                    reason="test",
                    created_at=now,
                    expires_at=now + timedelta(hours=1),
                )
            )
        s.commit()


def _metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(f"{name}_total", labels) or 0.0


def test_every_outcome_is_an_event_with_tenant_stream_domain_and_attempt_number(world):
    delivered_before = _metric("axiom_delivery_outcomes", provider="google", category="delivered")
    unknown_before = _metric(
        "axiom_delivery_outcomes", provider="generic", category="mailbox_unknown"
    )
    world.sink("gmail.com")
    world.sink("example.org", ["-r", "RCPT", "-b", "451 4.3.0 Try again later"])
    world.sink(
        "unknown-users.test",
        ["-f", "RCPT", "-B", "550 5.1.1 <dave@unknown-users.test>: User unknown"],
    )
    world.submit(["ann@gmail.com"], stream="marketing")
    world.submit(["carol@example.org"])
    world.submit(["dave@unknown-users.test"])
    world.submit(["erin@nullmx.test"])
    world.run(rounds=1)
    events = {e.recipient: e for e in world.events()}
    assert set(events) == {
        "ann@gmail.com",
        "carol@example.org",
        "dave@unknown-users.test",
        "erin@nullmx.test",
    }
    for e in events.values():
        assert (e.kind, e.tenant_id, e.from_domain, e.attempt) == (
            "attempt",
            world.tenant_id,
            "acme.example",
            1,
        )
    assert events["ann@gmail.com"].stream == "marketing"
    assert events["carol@example.org"].stream == "transactional"
    ann = events["ann@gmail.com"]
    assert (ann.category, ann.provider, ann.mx_host) == (
        "delivered",
        "google",
        "gmail-smtp-in.l.google.com",
    )
    assert ann.source_ip in ("127.0.0.10", "127.0.0.11")
    carol = events["carol@example.org"]
    assert (carol.category, carol.permanent, carol.reply_code) == ("transient", False, 451)
    dave = events["dave@unknown-users.test"]
    assert (dave.category, dave.permanent, dave.enhanced_code) == (
        "mailbox_unknown",
        True,
        "5.1.1",
    )
    erin = events["erin@nullmx.test"]
    assert erin.permanent and erin.source_ip is None  # no MX: refused before any connection
    # Prometheus counts the same outcomes by provider and category (bounded labels).
    assert _metric("axiom_delivery_outcomes", provider="google", category="delivered") == (
        delivered_before + 1
    )
    assert (
        _metric("axiom_delivery_outcomes", provider="generic", category="mailbox_unknown")
        == unknown_before + 1
    )
    # The retry is attempt 2, with the same tenant, stream and domain.
    world.sink("example.org")
    world.clock.advance(400)
    world.run(rounds=1)
    retries = [e for e in world.events() if e.recipient == "carol@example.org"]
    assert [(e.attempt, e.category) for e in retries] == [(1, "transient"), (2, "delivered")]
    assert _tally(world) == {}  # everything was attempted: nothing held


def test_each_decision_not_to_send_now_is_counted_per_reason_and_subject(world):
    world.sink("gmail.com")
    world.sink("yahoo.com")
    world.sink("example.org")
    # suspended: every IP of the pool suspended for Google.
    _suspend(world, "google")
    # capped: a warm-up cap of 0 today for Yahoo on both IPs.
    with Session(world.engine) as s:
        for ip in s.exec(select(IpAddress)).scalars():
            plan = WarmupPlan(
                ip_id=ip.id,
                schedule_id="t",
                runbook_version="1",
                started_on=world.clock.now().date(),
            )
            s.add(plan)
            s.flush()
            s.add(WarmupDay(plan_id=plan.id, day=world.clock.now().date(), provider="yahoo", cap=0))
        # held: stream "newsletter" bound to the hold pool; no_ip: "alerts" to an empty pool.
        hold, empty = IpPool(name=HOLD_POOL), IpPool(name="empty")
        s.add_all([hold, empty])
        s.flush()
        s.add(Stream(tenant_id=world.tenant_id, name="newsletter", pool_id=hold.id))
        s.add(Stream(tenant_id=world.tenant_id, name="alerts", pool_id=empty.id))
        s.commit()
    world.submit(["g1@gmail.com"])
    world.submit(["g2@gmail.com"])
    world.submit(["y1@yahoo.com", "y2@yahoo.com"])
    world.submit(["n1@example.org"], stream="newsletter")
    world.submit(["a1@example.org"], stream="alerts")
    world.run(rounds=1)
    assert world.events() == []  # no attempt was made
    assert _metric("axiom_delivery_held", reason="capped", provider="yahoo") >= 2
    assert _tally(world) == {
        ("suspended", "transactional", "google", ""): 2,
        ("capped", "transactional", "yahoo", ""): 2,
        ("held", "newsletter", "generic", ""): 1,
        ("no_ip", "alerts", "generic", ""): 1,
    }
    # Looked at again later: the same subjects count up in a new interval, not in new rows
    # per wait within one interval.
    world.clock.advance(16 * 60)
    with world.engine.begin() as conn:  # due again now
        from models import Recipient

        conn.execute(update(Recipient).values(next_attempt_at=world.clock.now()))
    world.run(rounds=1)
    with Session(world.engine) as s:
        rows = s.exec(select(HoldTally)).scalars().all()
    intervals = {r.interval_start.replace(tzinfo=None) for r in rows}
    assert len(intervals) == 2 and len(rows) == 8
    assert interval_start(world.clock.now()).replace(tzinfo=None) in intervals
    assert _tally(world)[("suspended", "transactional", "google", "")] == 4
    google = next(r for r in rows if r.reason == "suspended")
    assert "suspended for google" in google.last_detail


def test_a_paused_tenant_and_a_paced_path_are_counted_too(world):
    world.sink("gmail.com")
    world.sink("example.org")
    # paced: one message a minute on each path to Google. One at a time (jobs running side
    # by side all see the path unused): by the third, both IPs' paths have sent this minute,
    # and a wait past the short pacing wait goes back to the queue without an attempt.
    _suspend(world, "google", action="throttle", limit=1)
    for i in range(3):
        world.submit([f"p{i}@gmail.com"])
        world.run(rounds=1)
    tally = _tally(world)
    paced = {k: v for k, v in tally.items() if k[0] == "paced"}
    assert sum(paced.values()) >= 1, tally
    assert all(k[2] == "google" and k[3] in ("127.0.0.10", "127.0.0.11") for k in paced), paced
    with Session(world.engine) as s:
        s.exec(update(Tenant).where(Tenant.id == world.tenant_id).values(paused=True))
        s.commit()
    world.submit(["q1@example.org", "q2@example.org"])
    world.run(rounds=1)
    assert _tally(world)[("paused", "transactional", "", "")] >= 2
