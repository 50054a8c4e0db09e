"""Warm-up caps hold across several `axiom deliver` processes on PostgreSQL (issue 15).

A cold IP on a warm-up plan whose day has no row yet (the relay writes it, at the plan's
cap), a warm fallback pool, several delivery processes claiming at once: exactly the cap
leaves from the cold IP, all of it marked mail (its plan takes marked messages only), the
rest leaves from the fallback pool, nothing is lost. The receivers' captured transactions
are the ground truth (X-Client-Addr: from where; X-Rcpt-Args: to whom)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select, update

from models import IpAddress, IpPool, IpState, Message, Recipient, Stream, WarmupDay, WarmupPlan
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from runbooks.loader import ip_warmup
from runbooks.warmup import cap_for
from testbed.dns import knot  # noqa: F401  (fixture)
from tests.integration.delivery_world import make_world
from tests.integration.test_delivery_processes import _delivered, _transactions, deliverer

pytestmark = pytest.mark.integration

COLD, FALLBACK = "127.0.0.20", ["127.0.0.21", "127.0.0.22"]
DOMAIN = "example.org"  # a provider with no cap of its own: the plan's "*" cap
PLAN, STAGE = "sandbox", 2
TOTAL, MARKED, NODES = 200, 60, 3


@pytest.fixture
def world(engine, knot):  # noqa: F811
    w = make_world(engine, knot, pools={"cold": [COLD], "warm": FALLBACK})
    w.sink(DOMAIN, capture=True)
    yield w
    w.stop()


@pytest.fixture
def processes():
    started = []
    yield started
    for proc in started:
        proc.stop()


def _spool(world) -> dict[str, bool]:
    """TOTAL messages of one recipient each, every (TOTAL // MARKED)-th marked as a warm-up
    candidate, as the submission server stores them; due now (the processes' system clock)."""
    entries, marked = [], {}
    now = datetime.now(UTC)
    step = TOTAL // MARKED
    for i in range(TOTAL):
        rcpt = f"r{i:04d}@{DOMAIN}"
        queue_id = new_queue_id()
        marked[rcpt] = i % step == 0 and len([m for m in marked.values() if m]) < MARKED
        data = (
            f"From: shop@acme.example\r\nTo: {rcpt}\r\nSubject: order {i}\r\n"
            f"Message-ID: <{queue_id}@acme.example>\r\n\r\nYour order {i} has shipped.\r\n"
        ).encode()
        entry = SpoolEntry(
            queue_id,
            world.tenant_id,
            "transactional",
            "shop@acme.example",
            [rcpt],
            "acme.example",
            f"<{queue_id}@acme.example>",
            data,
            "127.0.0.1",
            "acme-app",
            created_at=now,
            warmup_candidate=marked[rcpt],
        )
        entries.append(entry)
    messages, rows = spool_rows(entries)
    with world.engine.begin() as conn:
        conn.execute(insert(Message), messages)
        conn.execute(insert(Recipient), rows)
    return marked


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_several_delivery_processes_send_exactly_the_cap_from_a_cold_ip(
    axiom_home, world, processes
):
    cap = cap_for(ip_warmup().spec.plans[PLAN], "*", STAGE)
    with world.engine.begin() as conn:
        pools = dict(conn.execute(select(IpPool.name, IpPool.id)).all())
        conn.execute(update(IpAddress).where(IpAddress.address == COLD).values(state=IpState.cold))
        conn.execute(
            insert(Stream).values(
                tenant_id=world.tenant_id,
                name="transactional",
                pool_id=pools["cold"],
                fallback_pool_id=pools["warm"],
                created_at=datetime.now(UTC),
            )
        )
        cold_id = conn.execute(select(IpAddress.id).where(IpAddress.address == COLD)).scalar_one()
        conn.execute(
            insert(WarmupPlan).values(
                ip_id=cold_id,
                schedule_id=PLAN,
                runbook_version="1.0",
                started_on=datetime.now(UTC).date(),
                state="running",
                stages={"*": STAGE},
                held={},
                candidates="marked",
                created_at=datetime.now(UTC),
            )
        )
        assert conn.execute(select(WarmupDay.id)).first() is None  # no row written in advance
    assert 0 < cap < MARKED < TOTAL

    marked = _spool(world)
    procs = [deliverer(axiom_home, world, f"node-{n}.axiom.test").start() for n in range(NODES)]
    processes.extend(procs)
    started = time.monotonic()
    while (done := _delivered(world)) < TOTAL:
        for proc in procs:
            assert proc.proc.poll() is None, proc.output()[-3000:]
        assert time.monotonic() - started < 120, f"{done}/{TOTAL} delivered after 120 s"
        time.sleep(0.2)
    # Let the last transactions' dumps land and any late job settle before counting.
    deadline = time.monotonic() + 10
    while len(_transactions(world)) < TOTAL and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in procs:
        assert proc.stop() == 0

    sent = _transactions(world)
    by_source = Counter(client for _, client, _ in sent)
    received = Counter(rcpt for _, _, rcpts in sent for rcpt in rcpts)
    from_cold = [rcpt for _, client, rcpts in sent if client == COLD for rcpt in rcpts]
    with world.engine.connect() as conn:
        days = {
            r.provider: (r.cap, r.sent)
            for r in conn.execute(select(WarmupDay.provider, WarmupDay.cap, WarmupDay.sent))
        }
        states = Counter(conn.execute(select(Recipient.state)).scalars())
    print(
        f"\n{NODES} delivery processes, cap {cap} on {COLD}: sent {dict(by_source)}, "
        f"{len(days)} day rows written by the relay"
    )
    assert set(received) == set(marked) and set(received.values()) == {1}  # none lost
    assert states == {"delivered": TOTAL}
    assert by_source[COLD] == cap
    assert sum(by_source[ip] for ip in FALLBACK) == TOTAL - cap
    assert all(marked[rcpt] for rcpt in from_cold)  # a "marked" plan takes nothing else
    assert days["*"] == (cap, cap)
    assert len(days) == len(ip_warmup().spec.providers) + 1
