"""The fault matrix: what Axiom survives, with real traffic, one scenario per function.

Every scenario runs real processes on loopback (`axiom relay`, `axiom deliver`, Knot DNS,
smtp-sink receivers, a private PostgreSQL, a Prefect server), drives real SMTP submissions
through them, injects one fault, and then reconciles three ledgers: what each client was told
(testbed/submitters.py), what the spool holds, and what the receivers got. Each message
carries a unique X-Test-Seq marker, so every copy a receiver stored is traced to its attempt.

    sent          messages whose DATA went out
    acknowledged  of those, answered 250 with a queue id
    delivered     acknowledged messages every recipient of which got a copy
    duplicates    copies beyond the first of a (message, recipient) pair (at-least-once)
    lost          acknowledged messages with a recipient neither delivered nor bounced

A row passes when lost is 0 and the scenario's own expectations hold (listed in its notes when
they fail). Every load loop is bounded in count and in time, and every process started is
stopped, whatever happens.

Time compression: deferred mail is retried 5 minutes later at the earliest
(runbooks/delivery.yaml). Where a scenario must watch retries (DNS outage, 421 receiver), it
moves the deferred recipients' next_attempt_at to now, as if that time had passed; the real
relay process then claims, attempts and settles them exactly as it would later.

The scenarios are defined once, here, and run at two scales: FULL by `make reliability`
(bench/reliability.py prints the table and writes bench/out/reliability.json), SHORT by
tests/integration/test_fault_matrix.py in `make test`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import re
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table
from sqlalchemy import Engine, func, select, update

from models import Message, Recipient, RecipientState, Suspension
from models.db import make_engine, session_scope
from testbed.axiom import AxiomHome, DeliverProcess, RelayProcess, make_home
from testbed.postgres import PostgresCluster
from testbed.prefect import PrefectServer
from testbed.receivers import Receivers
from testbed.submitters import (
    SEQ_HEADER,
    Ledger,
    seed_clients,
    start_clients,
    wait_for_acks,
)

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the Prefect probe imports flows/
BOUND_SOURCE = "127.0.0.2"  # the network-bound tenant's clients submit from here
SHORT_LEASE = {"AXIOM_DELIVERY_LEASE_SECONDS": "5"}  # a killed worker's claims return in 5 s
# High-volume receivers sit behind the big providers' MX names: their shaping has no per-minute
# limit, so pacing never postpones mail and a row measures the fault, not the throttle.
PROVIDERS = {
    "gmail.com": ("gmail-smtp-in.l.google.com", "127.0.80.1"),
    "yahoo.com": ("mta5.am0.yahoodns.net", "127.0.80.2"),
    "outlook.com": ("outlook-com.olc.protection.outlook.com", "127.0.80.3"),
}


@dataclass(frozen=True)
class Scale:
    """How much traffic each scenario drives. FULL for `make reliability`, SHORT for `make test`."""

    clients: int = 20  # concurrent submission clients in the kill -9 scenario
    kill_rounds: int = 5
    round_min_acks: int = 40  # acknowledged in a round before the kill may fall
    kill_budget: int = 3000  # messages in all, whatever the rounds
    delivery_messages: int = 1000  # spooled for the delivery-side kills
    delivery_kills: int = 4
    outage_clients: int = 8
    outage_seconds: float = 10.0
    outage_modes: tuple[str, ...] = ("fast", "immediate")  # pg_ctl stop -m
    full_fs_messages: int = 400
    dns_messages: int = 60
    dns_rounds: int = 2  # attempts each recipient sees while DNS is down
    tarpit_messages: int = 40
    tarpit_delay: int = 2  # seconds smtp-sink waits before each reply
    fast_messages: int = 60
    busy_messages: int = 40
    busy_rounds: int = 3  # attempts each recipient sees against the 421 receiver
    prefect_messages: int = 100
    settle_seconds: float = 180.0  # bound on waiting for the queue to empty


FULL = Scale()
SHORT = Scale(
    clients=20,
    kill_rounds=3,
    round_min_acks=10,
    kill_budget=1500,  # 600 ran out before the third kill once the relay got faster (CI)
    delivery_messages=300,  # 120 ran out before the second kill once (all delivered in between)
    delivery_kills=2,
    outage_clients=6,
    outage_seconds=3.0,
    outage_modes=("fast",),
    full_fs_messages=120,
    dns_messages=12,
    dns_rounds=2,
    tarpit_messages=20,
    tarpit_delay=1,
    fast_messages=20,
    busy_messages=10,
    busy_rounds=2,
    prefect_messages=20,
    settle_seconds=90.0,
)


@dataclass
class Row:
    scenario: str
    key: str = ""
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    failures: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.failures

    @property
    def result(self) -> str:
        return "ok" if self.ok else "FAIL"

    def expect(self, condition: bool, what: str) -> bool:
        if not condition:
            self.failures.append(what)
        return condition

    def as_dict(self) -> dict:
        data = asdict(self)
        data["result"] = self.result
        return data


# ---------------------------------------------------------------- the world around the relay
def client_tls(home: AxiomHome) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(home.path / "tls" / "cert.pem"))


# ---------------------------------------------------------------- observing the spool
def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.1) -> float | None:
    """Seconds until predicate() held, or None if it did not within timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(poll)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def queued_mail(engine: Engine) -> int:
    """Recipients still queued, DSNs left out (their null-sender mail goes to the tenants'
    own domains, which no receiver here serves)."""
    with engine.connect() as conn:
        return conn.execute(
            select(func.count())
            .select_from(Recipient)
            .join(Message, Message.id == Recipient.message_id)
            .where(Recipient.state == RecipientState.queued, Message.mail_from != "")
        ).scalar_one()


def recipients_of(engine: Engine, queue_ids: Iterable[str]) -> list[Recipient]:
    ids = list(queue_ids)
    rows: list[Recipient] = []
    with session_scope(engine) as s:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows += s.scalars(select(Recipient).where(Recipient.message_id.in_(chunk))).all()
    return rows


def retry_now(engine: Engine) -> int:
    """Time compression: every queued recipient is due now, as if its retry time had come."""
    with engine.begin() as conn:
        return conn.execute(
            update(Recipient)
            .where(Recipient.state == RecipientState.queued)
            .values(next_attempt_at=datetime.now(UTC))
        ).rowcount


def dsn_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(Message).where(Message.mail_from == "")
        ).scalar_one()


def message_seqs(engine: Engine) -> dict[str, str]:
    """queue id -> X-Test-Seq, for every spooled message that carries one."""
    found = {}
    with engine.connect() as conn:
        for mid, data in conn.execute(select(Message.id, Message.data)):
            match = SEQ_HEADER.search(data)
            if match:
                found[mid] = match.group(1).decode()
    return found


def leased_pairs(engine: Engine, owner: str | None = None) -> set[tuple[str, str]]:
    """(queue id, recipient) claimed and not settled: by owner, or by anyone."""
    held = select(Recipient.message_id, Recipient.address).where(
        Recipient.state == RecipientState.queued,
        Recipient.lease_owner == owner if owner else Recipient.lease_owner.is_not(None),
    )
    with engine.connect() as conn:
        return {(m, a) for m, a in conn.execute(held)}


def duplicates_beyond(
    copies: Counter, leased: set[tuple[str, str]], engine: Engine
) -> list[tuple[str, str]]:
    """Pairs received more than once that no killed process held a claim on: at-least-once
    allows a second copy only of what was in flight when a process died."""
    seqs = message_seqs(engine)
    allowed = {(seqs.get(m), a) for m, a in leased}
    return sorted(pair for pair, n in copies.items() if n > 1 and pair not in allowed)


def account(row: Row, ledger: Ledger, copies: Counter, engine: Engine) -> None:
    """Fill the row's counts from the clients' ledger, the receivers' copies and the spool."""
    with engine.connect() as conn:
        states = {
            (mid, address): state
            for mid, address, state in conn.execute(
                select(Recipient.message_id, Recipient.address, Recipient.state)
            )
        }
    attempts = list(ledger.attempts)
    acked = [a for a in attempts if a.outcome == "queued"]
    row.sent = len(attempts)
    row.acknowledged = len(acked)
    lost, bounced = [], 0
    for a in acked:
        fates = set()
        for rcpt in a.recipients:
            if copies[(a.seq, rcpt)]:
                fates.add("delivered")
            elif states.get((a.queue_id, rcpt)) in (RecipientState.bounced, RecipientState.expired):
                fates.add("bounced")
            else:
                fates.add("lost")
        if "lost" in fates:
            lost.append(f"{a.seq} ({a.queue_id})")
        elif fates == {"delivered"}:
            row.delivered += 1
        else:
            bounced += 1
    row.lost = len(lost)
    row.duplicates = sum(n - 1 for n in copies.values() if n > 1)
    by_seq = {a.seq: a for a in attempts}
    received = {seq for seq, _ in copies}
    unexplained = sorted(s for s in received if s not in by_seq)
    refused_but_delivered = sorted(
        s for s in received if s in by_seq and by_seq[s].outcome == "refused"
    )
    unknown = [a for a in attempts if a.outcome == "unknown"]
    if bounced:
        row.details["bounced"] = bounced
    if unknown:
        row.details["no reply (connection cut)"] = len(unknown)
        row.details["of which delivered"] = sum(1 for a in unknown if a.seq in received)
    if lost:
        row.details["lost (first 5)"] = lost[:5]
    if refused_but_delivered:
        row.details["refused but delivered"] = refused_but_delivered[:5]
    row.expect(not unexplained, f"receivers got mail nobody sent: {unexplained[:5]}")
    row.expect(not ledger.client_errors, f"client errors: {ledger.client_errors[:3]}")


def settle(
    row: Row, engine: Engine, receivers: Receivers, ledger: Ledger, timeout: float
) -> float | None:
    """Wait until no recipient is queued and every acknowledged (message, recipient) reached
    its receiver or bounced; a row failure if that does not happen within timeout."""

    def pending() -> int:
        if queued := queued_mail(engine):
            return queued
        copies = receivers.copies()
        missing = [(a, r) for a in ledger.acked() for r in a.recipients if not copies[(a.seq, r)]]
        if not missing:
            return 0
        final = {
            (x.message_id, x.address)
            for x in recipients_of(engine, {a.queue_id for a, _ in missing})
            if x.state in (RecipientState.bounced, RecipientState.expired)
        }
        return sum(1 for a, r in missing if (a.queue_id, r) not in final)

    took = wait_until(lambda: pending() == 0, timeout, poll=0.25)
    if took is None:
        row.failures.append(f"not settled after {timeout:.0f}s: {pending()} recipients pending")
    return took


def rejections_between(ledger: Ledger, start: float, end: float) -> list:
    return [r for r in list(ledger.rejected_replies) if start <= r.at <= end]


def run_clients(
    ledger: Ledger,
    count: int,
    kinds,
    relay: RelayProcess,
    tls,
    *,
    messages: int,
    timeout: float,
    **options,
) -> float:
    """Submit `messages` more messages with `count` clients and wait for them (bounded)."""
    ledger.budget = len(ledger.attempts) + messages
    stop = threading.Event()
    started = time.monotonic()
    threads = start_clients(
        count,
        kinds,
        relay.submission,
        tls,
        ledger,
        stop,
        started + timeout,
        bound_source=BOUND_SOURCE,
        **options,
    )
    for t in threads:
        t.join(timeout=timeout + 15)
    stop.set()
    return time.monotonic() - started


# ---------------------------------------------------------------- 1. kill -9 of the relay
def kill_relay_during_submission(work: Path, scale: Scale, db_url: str | None = None) -> Row:
    row = Row("kill -9 relay during submission")
    started = time.monotonic()
    rng = random.Random()
    with contextlib.ExitStack() as stack:
        home = make_home(work / "home", db_url or f"sqlite:///{work / 'axiom.db'}")
        authed, bound = seed_clients(home, "kill", BOUND_SOURCE)
        world = stack.enter_context(Receivers(PROVIDERS)).start()
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        relay = RelayProcess(home, world.env | SHORT_LEASE)
        stack.callback(relay.stop)
        ledger = Ledger(budget=scale.kill_budget)
        leased: set[tuple[str, str]] = set()
        stop = threading.Event()
        stack.callback(stop.set)
        deadline = time.monotonic() + 30 + scale.kill_rounds * 20
        relay.start()
        ledger.round = 1
        threads = start_clients(
            scale.clients,
            [("auth", authed), ("bound", bound)],
            relay.submission,
            client_tls(home),
            ledger,
            stop,
            deadline,
            bound_source=BOUND_SOURCE,
            domains=world.domains,
            max_lines=60,
        )
        try:
            for round_no in range(1, scale.kill_rounds + 1):
                if round_no > 1:
                    time.sleep(rng.uniform(0.1, 0.5))  # clients meet a dead port for a while
                    with ledger.lock:
                        ledger.round = round_no
                    relay.start()
                acks = wait_for_acks(ledger, round_no, scale.round_min_acks, 30)
                if not row.expect(
                    acks >= scale.round_min_acks,
                    f"round {round_no}: only {acks} acknowledged after restart",
                ):
                    break
                time.sleep(rng.uniform(0.05, 0.8))  # the kill falls at a random point
                relay.kill9()
                leased |= leased_pairs(engine)  # what it was delivering: maybe sent, not settled
                time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=15)
        row.expect(not any(t.is_alive() for t in threads), "a client thread did not finish")
        relay.start()  # after the last crash: it delivers what the others left
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.stop() == 0, "relay did not stop cleanly after recovery")
        copies = world.copies()
        account(row, ledger, copies, engine)
        beyond = duplicates_beyond(copies, leased, engine)
        row.expect(not beyond, f"duplicates of mail no killed relay was delivering: {beyond[:5]}")
        broken = ledger.broken_sessions_by_round
        row.expect(
            all(broken.get(r, 0) > 0 for r in range(1, scale.kill_rounds + 1)),
            f"a kill cut no live session: {broken}",
        )
        row.details.update(
            {
                "kills": scale.kill_rounds,
                "clients": scale.clients,
                "sessions cut per kill": [
                    broken.get(r, 0) for r in range(1, scale.kill_rounds + 1)
                ],
                "claims held by the killed relays": len(leased),
                "all duplicates held by a killed relay": not beyond,
                "queue empty after last restart (s)": _round(took, 1),
            }
        )
    row.seconds = time.monotonic() - started
    return row


# ---------------------------------------------------------------- 2. kill -9 of `axiom deliver`
DELIVERY_IPS = ("127.0.80.100", "127.0.80.101", "127.0.80.102")  # with 127.0.0.1: 4 paths each


def kill_delivery_mid_batch(work: Path, scale: Scale, db_url: str) -> Row:
    """A spooled backlog, two `axiom deliver` processes on one PostgreSQL spool; again and again
    the one holding the most claims is killed mid-batch (it has been sending for a while) and
    a fresh one takes its place. Receivers answer DATA after a second, so batches take time."""
    row = Row("kill -9 axiom deliver mid-batch")
    started = time.monotonic()
    rng = random.Random()
    with contextlib.ExitStack() as stack:
        home = make_home(work / "home", db_url, extra_ips=DELIVERY_IPS)
        _, bound = seed_clients(home, "dk", BOUND_SOURCE)
        world = stack.enter_context(Receivers(PROVIDERS))
        world.start({domain: ["-w", "1"] for domain in PROVIDERS})
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        relay = RelayProcess(home, {"AXIOM_DELIVERY_ENABLED": "false"})
        stack.callback(relay.stop)
        relay.start()
        ledger = Ledger()
        run_clients(
            ledger, 8, [("bound", bound)], relay, client_tls(home),
            messages=scale.delivery_messages, timeout=120, domains=world.domains, max_lines=20,
            prefix="k",
        )  # fmt: skip
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        env = world.env | SHORT_LEASE
        workers: list[DeliverProcess] = []

        def launch() -> DeliverProcess:
            worker = DeliverProcess(home, f"w{len(workers)}", env).launch()
            stack.callback(worker.stop)
            workers.append(worker)
            return worker

        live = [launch(), launch()]
        for worker in live:
            worker.wait_ready()
        held_at_kills: list[int] = []
        leased: set[tuple[str, str]] = set()
        busiest: list[DeliverProcess] = []

        def holding() -> bool:
            """Whether a live worker holds claims on queued recipients; the busiest first."""
            ready = [w for w in live if w.node_id]
            with engine.connect() as conn:
                owners = Counter(
                    conn.execute(
                        select(Recipient.lease_owner).where(
                            Recipient.state == RecipientState.queued,
                            Recipient.lease_owner.in_([w.node_id for w in ready]),
                        )
                    ).scalars()
                )
            busiest[:] = sorted(
                (w for w in ready if owners[w.node_id]), key=lambda w: -owners[w.node_id]
            )
            return bool(busiest)

        for k in range(scale.delivery_kills):
            if not row.expect(
                wait_until(holding, 30, poll=0.01) is not None,
                f"kill {k + 1}: no worker held a claim for 30 s",
            ):
                break
            time.sleep(rng.uniform(1.0, 2.0))  # mid-batch: some of it sent, some not
            if not holding():
                continue
            victim = busiest[0]
            victim.kill9()
            held = leased_pairs(engine, victim.node_id)
            held_at_kills.append(len(held))
            leased |= held
            live[live.index(victim)] = launch()
            for worker in live:
                if not worker.node_id:
                    worker.wait_ready()
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        for worker in live:
            row.expect(worker.stop() == 0, f"{worker.node_id} did not stop cleanly")
        copies = world.copies()
        account(row, ledger, copies, engine)
        beyond = duplicates_beyond(copies, leased, engine)
        row.expect(not beyond, f"duplicates of mail no killed worker held: {beyond[:5]}")
        row.expect(len(held_at_kills) == scale.delivery_kills, f"kills: {held_at_kills}")
        row.expect(
            all(n > 0 for n in held_at_kills), f"a kill fell between batches: {held_at_kills}"
        )
        with engine.connect() as conn:
            leftover = conn.execute(
                select(func.count())
                .select_from(Recipient)
                .where(Recipient.lease_owner.is_not(None))
            ).scalar_one()
        row.expect(leftover == 0, f"{leftover} leases left after the queue emptied")
        row.details.update(
            {
                "kills": len(held_at_kills),
                "claims held at each kill": held_at_kills,
                "duplicated pairs": sum(1 for n in copies.values() if n > 1),
                "all duplicates held by a killed worker": not beyond,
                "queue empty after last kill (s)": _round(took, 1),
            }
        )
    row.seconds = time.monotonic() - started
    return row


# ---------------------------------------------------------------- 3. PostgreSQL outage
def postgres_outage(work: Path, scale: Scale) -> Row:
    """A private PostgreSQL cluster is stopped under load and started again, once per shutdown
    mode (fast: sessions cut, clean stop; immediate: as if it crashed); the relay runs on."""
    row = Row("PostgreSQL stopped and restarted")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        pg = PostgresCluster().start()
        stack.callback(pg.destroy)
        home = make_home(work / "home", pg.url)
        authed, bound = seed_clients(home, "pg", BOUND_SOURCE)
        world = stack.enter_context(Receivers(PROVIDERS)).start()
        relay = RelayProcess(home, world.env | SHORT_LEASE)
        stack.callback(relay.stop)
        relay.start()
        pid = relay.proc.pid
        ledger = Ledger(budget=20_000)
        stop = threading.Event()
        stack.callback(stop.set)
        outages = len(scale.outage_modes)
        deadline = time.monotonic() + outages * (scale.outage_seconds + 60) + 30
        threads = start_clients(
            scale.outage_clients,
            [("bound", bound), ("auth", authed)],
            relay.submission,
            client_tls(home),
            ledger,
            stop,
            deadline,
            bound_source=BOUND_SOURCE,
            domains=world.domains,
            max_lines=30,
            pause=0.02,
        )
        windows: list[tuple[float, float]] = []  # (down from, down until)
        recoveries: list[float | None] = []
        try:
            for mode in scale.outage_modes:
                before = len(ledger.acked())
                row.expect(
                    wait_until(lambda n=before: len(ledger.acked()) >= n + 20, 20) is not None,
                    f"no traffic before the {mode} stop",
                )
                pg.stop(mode=mode)  # returns once the server is gone: nobody listens
                down_from = time.monotonic()
                time.sleep(scale.outage_seconds)
                windows.append((down_from, time.monotonic()))
                pg.start()
                up_at = time.monotonic()
                recoveries.append(
                    wait_until(
                        lambda t=up_at: any(a.data_sent_at > t for a in ledger.acked()), 60, 0.05
                    )
                )
                row.expect(recoveries[-1] is not None, f"no 250 within 60 s of the {mode} restart")
            time.sleep(1.0)  # traffic goes on after the recovery
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=20)
        restarted = not (relay.proc.poll() is None and relay.proc.pid == pid)
        row.expect(not restarted, "the relay restarted")
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        account(row, ledger, world.copies(), engine)

        def down(t: float) -> bool:
            return any(start < t < end for start, end in windows)

        # DATA sent and answered while nobody could commit: never a 250.
        accepted_down = [
            a.seq
            for a in ledger.attempts
            if a.outcome == "queued" and down(a.data_sent_at) and down(a.replied_at)
        ]
        refused_down = [r for r in list(ledger.rejected_replies) if down(r.at)]
        codes_down = Counter(f"{r.code} {_enhanced(r.text)}" for r in refused_down)
        stages_down = Counter(r.stage for r in refused_down)
        five = [r for r in ledger.rejected_replies if r.code >= 500]
        row.expect(len(refused_down) > 0, "nothing was refused while PostgreSQL was down")
        row.expect(not accepted_down, f"250 while PostgreSQL was down: {accepted_down[:5]}")
        row.expect(
            set(codes_down) <= {"451 4.3.0"},
            f"replies while down other than 451 4.3.0: {codes_down}",
        )
        row.expect(not five, f"5xx replies: {Counter(r.code for r in five)}")
        row.details.update(
            {
                "outages": [
                    f"{m} stop, {e - s:.0f}s"
                    for m, (s, e) in zip(scale.outage_modes, windows, strict=False)
                ],
                "replies while down": dict(codes_down),
                "refused at": dict(stages_down),
                "250 while down": len(accepted_down),
                "5xx": len(five),
                "first 250 after restart (s)": [_round(r) for r in recoveries],
                "relay restarted": restarted,
                "queue empty after (s)": _round(took, 1),
            }
        )
    row.seconds = time.monotonic() - started
    return row


def _enhanced(text: bytes) -> str:
    match = re.match(rb"\s*([245]\.\d{1,3}\.\d{1,3})", text)
    return match.group(1).decode() if match else "-"


# ---------------------------------------------------------------- 4. full filesystem
def full_filesystem(work: Path, scale: Scale, size_mb: int = 16, headroom_kb: int = 768) -> Row:
    """The SQLite spool on a small tmpfs that is filled up under load, then given room again."""
    row = Row("SQLite spool on a full filesystem")
    started = time.monotonic()
    mount = work / "spool"
    mount.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        stack.callback(_umount, mount)
        db = mount / "axiom.db"
        home = make_home(work / "home", f"sqlite:///{db}")
        _, bound = seed_clients(home, "fs", BOUND_SOURCE)
        world = stack.enter_context(Receivers(PROVIDERS)).start()
        relay = RelayProcess(home, world.env | SHORT_LEASE)
        stack.callback(relay.stop)
        relay.start()
        pid = relay.proc.pid
        filler = mount / "filler"
        stats = os.statvfs(mount)
        free = stats.f_bavail * stats.f_frsize
        with open(filler, "wb") as f:
            f.truncate(0)
            chunk = b"\0" * (1 << 20)
            remaining = max(free - headroom_kb * 1024, 0)
            while remaining > 0:
                remaining -= f.write(chunk[: min(len(chunk), remaining)])
        full_from = time.monotonic()
        ledger = Ledger()
        tls = client_tls(home)
        run_clients(
            ledger, 4, [("bound", bound)], relay, tls,
            messages=scale.full_fs_messages, timeout=90, domains=world.domains, max_lines=150,
            prefix="f",
        )  # fmt: skip
        full_until = time.monotonic()
        during = rejections_between(ledger, full_from, full_until)
        acked_full = len(ledger.acked())
        filler.unlink()
        freed_at = time.monotonic()
        run_clients(
            ledger, 2, [("bound", bound)], relay, tls,
            messages=10, timeout=60, domains=world.domains, max_lines=20, prefix="g",
        )  # fmt: skip
        after = [a for a in ledger.acked() if a.data_sent_at > freed_at]
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.proc.poll() is None and relay.proc.pid == pid, "the relay restarted")
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        account(row, ledger, world.copies(), engine)
        engine.dispose()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        codes = Counter(f"{r.code} {_enhanced(r.text)}" for r in during)
        row.expect(len(during) > 0, "the filesystem never filled up: nothing was refused")
        row.expect(
            all(r.code in (451, 452) for r in during), f"refusals other than 451/452: {codes}"
        )
        row.expect(
            not [r for r in ledger.rejected_replies if r.code >= 500], "5xx replies on a full disk"
        )
        row.expect(integrity == "ok", f"PRAGMA integrity_check: {integrity}")
        row.expect(len(after) >= 5, f"only {len(after)} acknowledged after space was freed")
        row.details.update(
            {
                "tmpfs": f"{size_mb} MB, {headroom_kb} KB left",
                "250 before full": acked_full,
                "refused while full": dict(codes),
                "250 after freeing": len(after),
                "integrity_check": integrity,
                "queue empty after (s)": round(took or -1, 1),
            }
        )
    row.seconds = time.monotonic() - started
    return row


def _umount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
    if result.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


# ---------------------------------------------------------------- 5. DNS unreachable
def dns_unreachable(work: Path, scale: Scale) -> Row:
    """The only nameserver stops answering while mail for uncached domains is queued."""
    row = Row("DNS server unreachable")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        home = make_home(work / "home", f"sqlite:///{work / 'axiom.db'}")
        _, bound = seed_clients(home, "dns", BOUND_SOURCE)
        world = stack.enter_context(Receivers(PROVIDERS)).start()
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        relay = RelayProcess(home, world.env)
        stack.callback(relay.stop)
        relay.start()
        ledger = Ledger()
        tls = client_tls(home)
        # The path works: a first batch to one domain goes out (and its MX is cached).
        run_clients(
            ledger, 2, [("bound", bound)], relay, tls, messages=4, timeout=30,
            domains=["gmail.com"], max_lines=10, prefix="w",
        )  # fmt: skip
        row.expect(wait_until(lambda: queued_mail(engine) == 0, 30) is not None, "warm-up stuck")
        world.stop_dns()
        run_clients(
            ledger, 2, [("bound", bound)], relay, tls, messages=scale.dns_messages, timeout=60,
            domains=["yahoo.com", "outlook.com"], max_lines=10, prefix="d",
        )  # fmt: skip
        outage = [a.queue_id for a in ledger.acked() if a.seq.startswith("d")]
        attempts_seen = []
        for round_no in range(1, scale.dns_rounds + 1):
            if round_no > 1:
                retry_now(engine)

            def attempted(n: int = round_no) -> bool:
                rows = recipients_of(engine, outage)
                return bool(rows) and all(r.attempts >= n for r in rows)

            row.expect(
                wait_until(attempted, 60, poll=0.2) is not None,
                f"round {round_no}: not every recipient was attempted while DNS was down",
            )
            attempts_seen.append(
                min((r.attempts for r in recipients_of(engine, outage)), default=0)
            )
        rows = recipients_of(engine, outage)
        states = Counter(str(r.state) for r in rows)
        replies = Counter(_reply_code(r.last_reply) for r in rows)
        row.expect(states == {"queued": len(rows)}, f"while DNS was down: {dict(states)}")
        row.expect(dsn_count(engine) == 0, "a DSN was sent while DNS was down")
        row.expect(
            all("4.4.3" in (r.last_reply or "") for r in rows),
            f"deferred with other replies than 4.4.3: {dict(replies)}",
        )
        world.start_dns()
        retry_now(engine)
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        account(row, ledger, world.copies(), engine)
        row.expect(row.details.get("bounced", 0) == 0, "mail bounced because DNS was down")
        row.details.update(
            {
                "recipients deferred while down": len(rows),
                "attempts while down (min)": attempts_seen[-1] if attempts_seen else 0,
                "deferral": dict(replies),
                "bounced or DSN while down": 0 if states == {"queued": len(rows)} else "yes",
                "delivered after DNS returned (s)": round(took, 1) if took is not None else None,
            }
        )
    row.seconds = time.monotonic() - started
    return row


def _reply_code(reply: str | None) -> str:
    parts = (reply or "").split()
    return " ".join(parts[:2]) if parts else "-"


# ---------------------------------------------------------------- 6. tarpit
TARPIT_RECEIVERS = {
    "fast.test": ("mx.fast.test", "127.0.80.20"),
    "slow.test": ("mx.slow.test", "127.0.80.21"),
}


def tarpit(work: Path, scale: Scale) -> Row:
    """A receiver that answers every command after a long wait, and one that does not: the
    second one's delivery time with and without the tarpit busy."""
    row = Row("tarpit receiver beside a fast one")
    started = time.monotonic()
    d = str(scale.tarpit_delay)
    slow_options = ["-W", f"CONNECT:{d}", "-W", f"EHLO:{d}", "-W", f"MAIL:{d}"]
    slow_options += ["-W", f"RCPT:{d}", "-w", d, "-W", f".:{d}"]
    # -p: no PIPELINING. smtp-sink's delayed replies (-W) are not pipelining-safe: it answers
    # a pipelined DATA "503 need RCPT" before MAIL's delayed reply, then hangs. A real tarpit
    # answers in order; the relay's pipelined exchange is tested against slow, in-order
    # replies in tests/unit/test_pipelining.py.
    slow_options += ["-p"]
    with contextlib.ExitStack() as stack:
        home = make_home(work / "home", f"sqlite:///{work / 'axiom.db'}")
        _, bound = seed_clients(home, "tp", BOUND_SOURCE)
        world = stack.enter_context(Receivers(TARPIT_RECEIVERS))
        world.start({"slow.test": slow_options})
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        relay = RelayProcess(home, world.env)
        stack.callback(relay.stop)
        relay.start()
        ledger = Ledger()
        tls = client_tls(home)

        def fast_batch(prefix: str, messages: int = scale.fast_messages) -> float | None:
            """Seconds from the first submission until the fast receiver has every message."""
            first = len(ledger.attempts)
            t0 = time.monotonic()
            run_clients(
                ledger, 4, [("bound", bound)], relay, tls, messages=messages, timeout=60,
                domains=["fast.test"], max_lines=10, prefix=prefix,
            )  # fmt: skip
            batch = [a for a in ledger.attempts[first:] if a.outcome == "queued"]

            def arrived() -> bool:
                copies = world.copies(["fast.test"])
                return all(copies[(a.seq, r)] for a in batch for r in a.recipients)

            took = wait_until(arrived, 120, poll=0.02)
            return None if took is None else time.monotonic() - t0

        fast_batch("w", 4)  # MX lookup and first session out of the way
        baseline = fast_batch("x")
        run_clients(
            ledger, 4, [("bound", bound)], relay, tls, messages=scale.tarpit_messages,
            timeout=60, domains=["slow.test"], max_lines=10, prefix="s",
        )  # fmt: skip
        time.sleep(float(d) + 0.5)  # the relay now sits in the tarpit's sessions
        slow_open = len(list(_connections_to(*world.address_of("slow.test"))))
        with_tarpit = fast_batch("y")
        slow_open = min(slow_open, len(list(_connections_to(*world.address_of("slow.test")))))
        tarpit_done = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        account(row, ledger, world.copies(), engine)
        row.expect(baseline is not None and with_tarpit is not None, "fast mail did not arrive")
        if baseline is not None and with_tarpit is not None:
            # Sharing the tarpit's slots shows as waiting for its transactions (4-6 replies).
            bound_s = max(2 * baseline, baseline + 2 * scale.tarpit_delay)
            row.expect(
                with_tarpit <= bound_s,
                f"the tarpit slowed the fast receiver: {with_tarpit:.2f}s vs {baseline:.2f}s",
            )
        row.expect(slow_open > 0, "the relay held no session to the tarpit during the measure")
        row.details.update(
            {
                "tarpit delay per reply (s)": scale.tarpit_delay,
                "fast receiver, no tarpit (s)": _round(baseline),
                "fast receiver, tarpit busy (s)": _round(with_tarpit),
                "sessions held by the tarpit throughout": slow_open,
                "tarpit mail all delivered after (s)": _round(tarpit_done),
            }
        )
    row.seconds = time.monotonic() - started
    return row


def _connections_to(address: str, port: int) -> Iterable[str]:
    """Established TCP connections to address:port, from /proc/net/tcp."""
    packed = bytes(int(x) for x in address.split("."))
    remote = f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[2] == remote and fields[3] == "01":
                yield fields[1]


# ---------------------------------------------------------------- 7. 421 on every attempt
BUSY_RECEIVERS = {
    "busy-connect.test": ("mx.busy-connect.test", "127.0.80.30"),  # 421 instead of a greeting
    "busy-mail.test": ("mx.busy-mail.test", "127.0.80.31"),  # 421 to MAIL FROM, then hangs up
}


def always_421(work: Path, scale: Scale) -> Row:
    """Two receivers that answer 421 and hang up on every attempt, one instead of its greeting,
    one to MAIL FROM: attempt after attempt defers, nothing bounces; once they recover, every
    message goes out."""
    row = Row("receiver answers 421 and drops")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        home = make_home(work / "home", f"sqlite:///{work / 'axiom.db'}")
        _, bound = seed_clients(home, "busy", BOUND_SOURCE)
        world = stack.enter_context(Receivers(BUSY_RECEIVERS))
        world.start({"busy-connect.test": ["-Q", "CONNECT"], "busy-mail.test": ["-Q", "MAIL"]})
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        relay = RelayProcess(home, world.env)
        stack.callback(relay.stop)
        relay.start()
        ledger = Ledger()
        run_clients(
            ledger, 2, [("bound", bound)], relay, client_tls(home), messages=scale.busy_messages,
            timeout=60, domains=world.domains, max_lines=10, prefix="q",
        )  # fmt: skip
        ids = [a.queue_id for a in ledger.acked()]
        for round_no in range(1, scale.busy_rounds + 1):
            if round_no > 1:
                retry_now(engine)

            def attempted(n: int = round_no) -> bool:
                rows = recipients_of(engine, ids)
                return bool(rows) and all(r.attempts >= n for r in rows)

            row.expect(
                wait_until(attempted, 60, poll=0.1) is not None,
                f"round {round_no}: not every recipient was attempted",
            )
        rows = recipients_of(engine, ids)
        states = Counter(str(r.state) for r in rows)
        replies = Counter(_reply_code(r.last_reply) for r in rows)
        with engine.connect() as conn:
            suspensions = conn.execute(select(func.count()).select_from(Suspension)).scalar_one()
        row.expect(states == {"queued": len(rows)}, f"after {scale.busy_rounds} x 421: {states}")
        row.expect(dsn_count(engine) == 0, "a DSN was sent for a 421")
        row.expect(
            all((r.last_reply or "").startswith("421") for r in rows),
            f"deferred with other replies: {dict(replies)}",
        )
        received_during = sum(world.copies().values())
        row.expect(received_during == 0, "a 421 receiver stored mail")
        # The receivers recover; the mail that waited goes out.
        for domain in world.domains:
            world.sink(domain)
        retry_now(engine)
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        account(row, ledger, world.copies(), engine)
        row.details.update(
            {
                "recipients": len(rows),
                "attempts each while 421": min((r.attempts for r in rows), default=0),
                "deferral": dict(replies),
                "bounced early": states.get("bounced", 0) + states.get("expired", 0),
                "suspensions": suspensions,
                "delivered after recovery (s)": _round(took, 1),
            }
        )
    row.seconds = time.monotonic() - started
    return row


# ---------------------------------------------------------------- 8. Prefect server stopped
PROBE_FLOW = """
from prefect import flow

@flow(name="reliability-probe")
def probe(marker: str) -> str:
    return marker

state = probe("{marker}", return_state=True)
print("probe", state.type.value, state.result(), flush=True)
try:  # the Protocol's deployments, as `axiom flows serve` registers them
    from flows.deployments import deployments

    for deployment in deployments():
        deployment.apply()
        print("deployment", deployment.name, flush=True)
except Exception as exc:
    print("deployments unavailable:", type(exc).__name__, str(exc)[:200], flush=True)
"""


def prefect_down(work: Path, scale: Scale) -> Row:
    """The relay runs with PREFECT_API_URL at a real Prefect server; the server is stopped and
    mail is submitted and delivered; the server returns and runs a flow."""
    row = Row("Prefect server stopped")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        server = PrefectServer()
        stack.callback(server.destroy)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        stack.callback(pool.shutdown)
        booting = pool.submit(server.start)  # it takes a while: set the rest up meanwhile
        home = make_home(work / "home", f"sqlite:///{work / 'axiom.db'}")
        _, bound = seed_clients(home, "pf", BOUND_SOURCE)
        world = stack.enter_context(Receivers(PROVIDERS)).start()
        engine = make_engine(home.db_url)
        stack.callback(engine.dispose)
        booting.result(timeout=120)
        relay = RelayProcess(home, world.env | {"PREFECT_API_URL": server.api_url})
        stack.callback(relay.stop)
        relay.start()
        ledger = Ledger()
        tls = client_tls(home)

        def batch(prefix: str) -> float | None:
            first = len(ledger.attempts)
            t0 = time.monotonic()
            run_clients(
                ledger, 4, [("bound", bound)], relay, tls, messages=scale.prefect_messages,
                timeout=60, domains=world.domains, max_lines=10, prefix=prefix,
            )  # fmt: skip
            sent = [a for a in ledger.attempts[first:] if a.outcome == "queued"]

            def arrived() -> bool:
                copies = world.copies()
                return all(copies[(a.seq, r)] for a in sent for r in a.recipients)

            took = wait_until(arrived, 60, poll=0.05)
            return None if took is None else time.monotonic() - t0

        with_server = batch("u")
        server.stop()
        row.expect(not server.healthy(), "the Prefect server still answers")
        without_server = batch("n")
        t_back = time.monotonic()
        server.start()
        back_in = time.monotonic() - t_back
        marker = f"probe-{os.getpid()}-{time.time_ns()}"
        probe = subprocess.run(
            [sys.executable, "-c", PROBE_FLOW.format(marker=marker)],
            env=server.env | {"PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        # The probe's runs only, filtered by the server: its scheduled deployments make the
        # scheduler add runs of their own, and once there were more than a page of them the
        # probe's run was not on the first page (a fresh clone: "states []").
        probe_flow = {"flows": {"name": {"any_": ["reliability-probe"]}}}
        runs = server.post("/flow_runs/filter", probe_flow | {"limit": 50})
        states = [r["state"]["type"] for r in runs]
        completed = f"probe COMPLETED {marker}" in probe.stdout and states == ["COMPLETED"]
        row.expect(
            completed,
            f"no flow completed after the restart: states {states}, "
            f"probe said {probe.stdout[:200]!r}, stderr {probe.stderr[-300:]!r}",
        )
        took = settle(row, engine, world, ledger, scale.settle_seconds)
        row.expect(relay.stop() == 0, "relay did not stop cleanly")
        account(row, ledger, world.copies(), engine)
        row.expect(
            with_server is not None and without_server is not None,
            "mail did not flow while Prefect was down",
        )
        if with_server is not None and without_server is not None:
            row.expect(
                without_server <= max(3 * with_server, with_server + 3.0),
                f"slower without Prefect: {without_server:.2f}s vs {with_server:.2f}s",
            )
        row.details.update(
            {
                "batch delivered, Prefect up (s)": _round(with_server),
                "batch delivered, Prefect down (s)": _round(without_server),
                "Prefect back in (s)": _round(back_in, 1),
                "flow run after return": "COMPLETED" if completed else "failed",
                "Protocol deployments registered after return": re.findall(
                    r"^deployment (\S+)", probe.stdout, re.MULTILINE
                )
                or probe.stdout.rpartition("deployments unavailable:")[2].strip()[:80],
                "scheduled Protocol flows catching up": "pending (no scheduled flow exists yet)",
                "queue empty after (s)": _round(took, 1),
            }
        )
    row.seconds = time.monotonic() - started
    return row


# ---------------------------------------------------------------- running the matrix
SCENARIOS: dict[str, Callable[..., Row]] = {
    "1": kill_relay_during_submission,
    "2": kill_delivery_mid_batch,
    "3": postgres_outage,
    "4": full_filesystem,
    "5": dns_unreachable,
    "6": tarpit,
    "7": always_421,
    "8": prefect_down,
}


def run_matrix(
    scale: Scale,
    only: Sequence[str] | None = None,
    say: Callable[[str], None] = print,
    keep: bool = False,
) -> list[Row]:
    rows = []
    for key, scenario in SCENARIOS.items():
        if only and key not in only:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"axiom-fault-{key}-"))
        say(f"scenario {key}: {scenario.__name__} …")
        try:
            if scenario is kill_delivery_mid_batch:
                with PostgresCluster() as pg:
                    row = scenario(work, scale, pg.url)
            else:
                row = scenario(work, scale)
        except Exception as exc:  # a broken scenario is a failed row, and the others still run
            row = Row(f"{key}. {scenario.__name__}", failures=[f"{type(exc).__name__}: {exc}"])
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        row.key = key
        rows.append(row)
        say(f"scenario {key}: {row.result} in {row.seconds:.1f}s")
    return rows


def table(rows: Sequence[Row]) -> Table:
    t = Table(title="Axiom fault matrix", show_lines=False)
    t.add_column("#", justify="right")
    t.add_column("scenario")
    for name in ("sent", "acknowledged (250)", "delivered", "duplicates", "lost"):
        t.add_column(name, justify="right")
    t.add_column("result")
    t.add_column("time", justify="right")
    for r in rows:
        t.add_row(
            r.key,
            r.scenario,
            str(r.sent),
            str(r.acknowledged),
            str(r.delivered),
            str(r.duplicates),
            str(r.lost),
            "[green]ok[/green]" if r.ok else "[red]FAIL[/red]",
            f"{r.seconds:.0f}s",
        )
    return t


def notes(rows: Sequence[Row]) -> list[str]:
    """One line per scenario: its own figures, and what failed."""
    lines = []
    for r in rows:
        figures = "; ".join(f"{k}: {v}" for k, v in r.details.items())
        lines.append(f"{r.key}. {r.scenario}: {figures}")
        lines += [f"   [red]FAILED[/red] {failure}" for failure in r.failures]
    return lines
