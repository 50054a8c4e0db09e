"""`axiom deliver` processes against smtp-sink receivers: kill -9 mid-batch, and two at once.

The spool is filled directly (as the relay's writer would), the delivery processes run as real
subprocesses with the system clock, and the receivers' captured transactions are the ground
truth: X-Rcpt-Args says who got a copy, X-Helo-Args which process sent it (every source IP here
has no PTR name, so EHLO carries the process's AXIOM_HOSTNAME), X-Client-Addr from where.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from models import Message, Recipient, RecipientState
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from testbed.axiom import AxiomHome, DeliverProcess
from testbed.dns import knot  # noqa: F401  (fixture)
from testbed.postfix import SmtpSink
from tests.integration.delivery_world import DeliveryWorld, make_world

pytestmark = pytest.mark.integration

# Providers whose shaping has no per-minute limit, so pacing never postpones mail here.
DOMAINS = ("gmail.com", "yahoo.com", "outlook.com")
SOURCE_IPS = [f"127.0.0.{i}" for i in range(20, 24)]  # no PTR names: EHLO is the hostname


def deliverer(home: AxiomHome, world: DeliveryWorld, hostname: str, **extra: str) -> DeliverProcess:
    """One `axiom deliver` subprocess pointed at the world; `hostname` is its EHLO name."""
    env = {
        "AXIOM_DNS_NAMESERVERS": world.knot.nameserver,
        "AXIOM_DELIVERY_PORT": str(world.port),
        "AXIOM_HOSTNAME": hostname,
        **extra,
    }
    return DeliverProcess(home, hostname, env)


@pytest.fixture
def processes():
    started: list[DeliverProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def world(engine, knot):  # noqa: F811
    w = make_world(engine, knot, pools={"default": SOURCE_IPS})
    for domain in DOMAINS:
        w.sink(domain, capture=True)
    yield w
    w.stop()


def _spool(
    world: DeliveryWorld, count: int, per_message: int = 1, domains: tuple[str, ...] = DOMAINS
) -> list[str]:
    """count recipients, per_message to a message, spread over domains; due now (system clock:
    the delivery processes use it). Returns the recipient addresses."""
    addresses = [f"r{i:05d}@{domains[i % len(domains)]}" for i in range(count)]
    entries = []
    now = datetime.now(UTC)
    for start in range(0, count, per_message):
        rcpts = addresses[start : start + per_message]
        queue_id = new_queue_id()
        data = (
            f"From: shop@acme.example\r\nTo: {', '.join(rcpts)}\r\nSubject: order {start}\r\n"
            f"Message-ID: <{queue_id}@acme.example>\r\n\r\nYour order {start} has shipped.\r\n"
        ).encode()
        entries.append(
            SpoolEntry(
                queue_id,
                world.tenant_id,
                "transactional",
                "shop@acme.example",
                rcpts,
                "acme.example",
                f"<{queue_id}@acme.example>",
                data,
                "127.0.0.1",
                "acme-app",
                created_at=now,
            )
        )
    for chunk in range(0, len(entries), 1000):
        messages, rows = spool_rows(entries[chunk : chunk + 1000])
        with world.engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), rows)
    return addresses


def _delivered(world: DeliveryWorld) -> int:
    with world.engine.connect() as conn:
        return conn.execute(
            select(func.count())
            .select_from(Recipient)
            .where(Recipient.state == RecipientState.delivered)
        ).scalar_one()


def _wait_delivered(world: DeliveryWorld, total: int, timeout: float, procs) -> float:
    started = time.monotonic()
    while (done := _delivered(world)) < total:
        for proc in procs:
            assert proc.proc.poll() is None, (
                f"{proc.env['AXIOM_HOSTNAME']} exited:\n{proc.output()[-3000:]}"
            )
        assert time.monotonic() - started < timeout, (
            f"{done}/{total} delivered after {timeout}s:\n"
            + "\n".join(p.output()[-2000:] for p in procs)
        )
        time.sleep(0.1)
    return time.monotonic() - started


def _transactions(world: DeliveryWorld) -> list[tuple[str, str, list[str]]]:
    """Every completed transaction the receivers stored: (EHLO name, client, recipients).
    smtp-sink keeps a dump only for a transaction that reached the final '.'."""
    found = []
    for sink in world.sinks.values():
        assert sink.dump_dir is not None
        for path in Path(sink.dump_dir).rglob("*"):
            if not path.is_file():
                continue
            head = path.read_bytes().split(b"\nReceived:", 1)[0].decode()
            fields = [line.split(": ", 1) for line in head.splitlines()]
            helo = next(v for k, v in fields if k == "X-Helo-Args")
            client = next(v for k, v in fields if k == "X-Client-Addr")
            rcpts = [v.split()[0].strip("<>") for k, v in fields if k == "X-Rcpt-Args"]
            found.append((helo, client, rcpts))
    return found


def _sink_counters(sinks: dict[str, SmtpSink]) -> str:
    return ", ".join(f"{d}: {len(list(Path(s.dump_dir).rglob('*')))}" for d, s in sinks.items())


def test_kill9_mid_batch_loses_nothing_and_duplicates_only_what_was_in_flight(
    axiom_home, world, processes
):
    total = 2000
    addresses = _spool(world, total)
    lease = {"AXIOM_DELIVERY_LEASE_SECONDS": "5"}
    first = deliverer(axiom_home, world, "node-a.axiom.test", **lease).start()
    processes.append(first)

    deadline = time.monotonic() + 60
    while _delivered(world) < total // 4:
        assert first.proc.poll() is None, first.output()[-3000:]
        assert time.monotonic() < deadline, f"no progress: {_delivered(world)}\n{first.output()}"
        time.sleep(0.02)
    first.kill9()
    killed_at = time.monotonic()

    # Whatever the dead process still held: claimed, maybe already sent, never settled.
    with world.engine.connect() as conn:
        leased = set(
            conn.execute(
                select(Recipient.address).where(
                    Recipient.state == RecipientState.queued,
                    Recipient.lease_owner == first.node_id,
                )
            ).scalars()
        )
    delivered_at_kill = _delivered(world)
    assert 0 < delivered_at_kill < total
    assert leased, "the kill fell between batches; nothing was in flight"

    second = deliverer(axiom_home, world, "node-b.axiom.test", **lease).start()
    processes.append(second)
    _wait_delivered(world, total, timeout=90, procs=[second])
    recovered_in = time.monotonic() - killed_at
    assert second.stop() == 0

    seen = Counter(rcpt for _, _, rcpts in _transactions(world) for rcpt in rcpts)
    assert set(seen) == set(addresses), "a recipient never reached its receiver"
    duplicates = {rcpt for rcpt, n in seen.items() if n > 1}
    assert all(seen[rcpt] == 2 for rcpt in duplicates), {
        r: seen[r] for r in duplicates if seen[r] > 2
    }
    assert duplicates <= leased, duplicates - leased  # only what the dead process held
    with world.engine.connect() as conn:
        states = Counter(conn.execute(select(Recipient.state)).scalars())
        leftovers = conn.execute(
            select(func.count()).select_from(Recipient).where(Recipient.lease_owner.is_not(None))
        ).scalar_one()
    assert states == {RecipientState.delivered: total}
    assert leftovers == 0
    print(
        f"\nkill -9 at {delivered_at_kill}/{total} delivered, {len(leased)} in flight, "
        f"{len(duplicates)} delivered twice; recovered in {recovered_in:.1f}s "
        f"({_sink_counters(world.sinks)})"
    )


def test_a_job_slower_than_its_lease_keeps_it_and_is_sent_once(axiom_home, world, processes):
    # The receiver takes 8 s to answer DATA; leases last 5 s. The process that claimed the
    # mail must keep renewing its leases, or the second process claims and sends it again.
    world.sink("example.org", ["-w", "8"], capture=True)
    addresses = _spool(world, 10, per_message=10, domains=("example.org",))
    lease = {"AXIOM_DELIVERY_LEASE_SECONDS": "5"}
    first = deliverer(axiom_home, world, "node-a.axiom.test", **lease).start()
    processes.append(first)
    deadline = time.monotonic() + 20
    while True:  # wait until node A holds all ten, then start node B beside it
        with world.engine.connect() as conn:
            owners = set(conn.execute(select(Recipient.lease_owner)).scalars())
        if owners == {first.node_id}:
            break
        assert time.monotonic() < deadline, owners
        time.sleep(0.02)
    second = deliverer(axiom_home, world, "node-b.axiom.test", **lease).start()
    processes.append(second)

    _wait_delivered(world, len(addresses), timeout=30, procs=[first, second])
    assert first.stop() == 0 and second.stop() == 0  # both drain what they hold first
    transactions = _transactions(world)
    assert [(helo, sorted(rcpts)) for helo, _, rcpts in transactions] == [
        ("node-a.axiom.test", sorted(addresses))
    ]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_delivery_processes_share_10000_recipients_exactly_once(axiom_home, world, processes):
    total = 10_000
    a = deliverer(axiom_home, world, "node-a.axiom.test")
    b = deliverer(axiom_home, world, "node-b.axiom.test")
    processes.extend([a, b])
    a.start()
    b.start()
    addresses = _spool(world, total)  # both are polling: they start on it together
    elapsed = _wait_delivered(world, total, timeout=150, procs=[a, b])
    assert a.stop() == 0 and b.stop() == 0

    transactions = _transactions(world)
    seen = Counter(rcpt for _, _, rcpts in transactions for rcpt in rcpts)
    assert set(seen) == set(addresses)
    assert max(seen.values()) == 1, [r for r, n in seen.items() if n > 1][:20]
    by_node = Counter()
    for helo, client, rcpts in transactions:
        assert client in SOURCE_IPS
        by_node[helo] += len(rcpts)
    assert set(by_node) == {"node-a.axiom.test", "node-b.axiom.test"}
    assert min(by_node.values()) >= total // 5, by_node  # both did a real share
    assert Counter(client for _, client, _ in transactions).keys() == set(SOURCE_IPS)
    print(
        f"\n{total} recipients in {elapsed:.1f}s = {total / elapsed:.0f}/s; "
        f"by process {dict(by_node)}"
    )
