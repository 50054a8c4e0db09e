"""Memory benchmark: the relay's resident memory with 100,000 messages queued stays under
300 MB, because the queue lives in the database, not in the process.

For each spool backend (SQLite in a fresh AXIOM_HOME, and a private PostgreSQL cluster):
provision a relay through the CLI, insert MESSAGES 2 KB messages with one recipient each
straight into the spool (relay.spool.writer.spool_rows, in batches: the same rows a submission
writes), half of them to a domain whose MX has nobody listening (connection refused) and half
to one whose MX, an smtp-sink, answers 4xx to RCPT; so every attempt defers and the queue
stays full. Then `axiom relay` starts with delivery on and works for SECONDS (claiming,
resolving, connecting, deferring), while VmRSS of its process tree (/proc/PID/status, the
parent plus its listener children) is sampled every INTERVAL seconds. The figure is the peak;
the final and start values show the trend. Results: terminal and bench/out/memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from bench.common import (  # noqa: E402
    DOMAIN,
    OUT_DIR,
    SENDER,
    SIZE,
    DeliveringRelay,
    LoadMeter,
    Receiver,
    ReceivingWorld,
    RssSample,
    SpoolProbe,
    console,
    machine_info,
    now_iso,
    sample_rss,
    say,
    slope_per_minute,
    write_json,
)
from bench.setups import background_load  # noqa: E402

OUT = OUT_DIR / "memory.json"
RECEIVERS = [
    # nobody listens at this address: every connection is refused at once
    Receiver("unreachable.test", "mx.unreachable.test", "127.0.91.1", listening=False),
    # smtp-sink -r RCPT: 4xx to every RCPT TO
    Receiver("deferring.test", "mx.deferring.test", "127.0.91.2", options=["-r", "RCPT"]),
]
BATCH = 5000


def message_bytes(seq: int, recipient: str) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: queued {seq}\r\n"
        f"Message-ID: <mem.{seq}@{DOMAIN}>\r\n\r\n"
    ).encode()
    line = b"X" * 76 + b"\r\n"
    return head + (line * (SIZE // len(line) + 1))[: SIZE - len(head)]


def spool_messages(relay: DeliveringRelay, tenant_id: int, count: int) -> float:
    """Insert count queued messages (one recipient each) straight into the spool; seconds."""
    from models import Message, Recipient
    from models.db import make_engine
    from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows

    engine = make_engine(relay.db_url)
    started = time.monotonic()
    domains = [r.domain for r in RECEIVERS]
    try:
        for first in range(0, count, BATCH):
            now = datetime.now(UTC)
            entries = []
            for seq in range(first, min(count, first + BATCH)):
                recipient = f"user{seq}@{domains[seq % len(domains)]}"
                entries.append(
                    SpoolEntry(
                        new_queue_id(),
                        tenant_id,
                        "transactional",
                        SENDER,
                        [recipient],
                        DOMAIN,
                        f"<mem.{seq}@{DOMAIN}>",
                        message_bytes(seq, recipient),
                        "127.0.0.1",
                        None,
                        created_at=now,
                    )
                )
            messages, recipients = spool_rows(entries)
            with engine.begin() as conn:
                conn.execute(insert(Message), messages)
                conn.execute(insert(Recipient), recipients)
            done = first + len(entries)
            if done % 20000 == 0 or done == count:
                say(f"    spooled {done:,}/{count:,} ({time.monotonic() - started:.0f}s)")
    finally:
        engine.dispose()
    return time.monotonic() - started


def measure_backend(backend: str, args, stack: ExitStack) -> dict:
    say(f"[bold]{backend}[/bold]: receiving world (Knot, a deferring smtp-sink, a dead MX)")
    world = ReceivingWorld(RECEIVERS)
    stack.callback(world.stop)
    world.start()
    env = dict(world.env)
    pg = None
    if backend == "postgresql":
        from testbed.postgres import PostgresCluster

        say("  starting a private PostgreSQL cluster")
        pg = PostgresCluster()
        stack.callback(pg.destroy)
        pg.start()
        env["AXIOM_DATABASE_URL"] = pg.url
    relay = DeliveringRelay(args.processes, env, domain=DOMAIN)
    stack.callback(relay.remove)
    say(f"  provisioning Axiom (AXIOM_RELAY_PROCESSES={args.processes}) with the axiom CLI")
    relay.provision()
    probe = SpoolProbe(relay.db_url)
    stack.callback(probe.close)
    say(
        f"  spooling {args.messages:,} messages of {SIZE} B directly (relay.spool.writer.spool_rows)"
    )
    spool_seconds = spool_messages(relay, probe.tenant_id(relay.tenant), args.messages)
    states = probe.states()
    if states.get("queued", 0) < args.messages:
        raise RuntimeError(f"{backend}: spool holds {states}, expected {args.messages} queued")

    def pgids() -> list[int]:
        groups = world.pgids()
        if relay.pid:
            groups.append(relay.pid)
        if pg is not None:
            groups += _postgres_pgids(pg)
        return groups

    meter = LoadMeter(pgids)
    say(f"  starting `axiom relay` with delivery on; sampling VmRSS every {args.interval}s")
    stack.callback(relay.stop)
    relay.start(timeout=120)
    started = time.monotonic()
    samples: list[RssSample] = [sample_rss(relay.pid, started)]
    say(f"    at ready: {samples[0].total_mb:.0f} MB")
    attempts0 = probe.attempts()
    last_print = time.monotonic()
    while time.monotonic() - started < args.seconds:
        time.sleep(args.interval)
        if not relay.running:
            raise RuntimeError(f"axiom relay exited:\n{relay.log.read_text()[-3000:]}")
        samples.append(sample_rss(relay.pid, started))
        if time.monotonic() - last_print >= 10:
            last_print = time.monotonic()
            s = samples[-1]
            say(
                f"    {s.at:5.0f}s  RSS {s.total_mb:6.1f} MB "
                f"({len(s.per_process_mb)} process{'es' if len(s.per_process_mb) > 1 else ''},"
                f" largest {s.largest_mb:.1f}), {probe.attempts() - attempts0:,} attempts so far"
            )
    load = meter.sample()
    attempts = probe.attempts() - attempts0
    relay.stop()
    states = probe.states()
    peak = max(samples, key=lambda s: s.total_mb)
    result = {
        "backend": backend,
        "messages_queued": args.messages,
        "spool_seconds": spool_seconds,
        "relay_processes": args.processes,
        "seconds": args.seconds,
        "delivery_attempts": attempts,
        "states_after": states,
        "rss_mb": {
            "at_ready": samples[0].total_mb,
            "peak": peak.total_mb,
            "final": samples[-1].total_mb,
            "peak_largest_process": max(s.largest_mb for s in samples),
            "slope_mb_per_minute": slope_per_minute(
                [(s.at, s.total_mb) for s in samples[len(samples) // 3 :]]
            ),
        },
        "limit_mb": args.limit_mb,
        "under_limit": peak.total_mb < args.limit_mb,
        "load": {"machine": load.machine, "ours": load.ours, "others": load.others},
        "samples": [{"at": s.at, "total_mb": s.total_mb} for s in samples],
    }
    say(
        f"  {backend}: peak {peak.total_mb:.0f} MB, final {samples[-1].total_mb:.0f} MB "
        f"(at ready {samples[0].total_mb:.0f}), {attempts:,} attempts in {args.seconds:.0f}s, "
        f"{states.get('queued', 0):,} still queued; {load.text()}"
    )
    return result


def _postgres_pgids(pg) -> list[int]:
    """The postmaster is a session leader of its own (pg_ctl starts it so); its backends
    share its process group."""
    try:
        pid = int((pg.data / "postmaster.pid").read_text().split()[0])
        return [os.getpgid(pid)]
    except (OSError, ValueError, IndexError):
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the relay works")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--processes", type=int, default=2, help="AXIOM_RELAY_PROCESSES")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--limit-mb", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "postgresql" in backends and os.geteuid() != 0:
        console.print("[red]The PostgreSQL backend needs root (a private cluster).[/red]")
        return 2

    say(
        f"memory benchmark: {args.messages:,} queued messages, relay works {args.seconds:.0f}s, "
        f"limit {args.limit_mb:.0f} MB of RSS, {os.cpu_count()} CPUs"
    )
    idle_load = background_load()
    say(f"background load before starting: {100 * idle_load:.0f}% of all cores")
    results = []
    for backend in backends:
        with ExitStack() as stack:
            results.append(measure_backend(backend, args, stack))
    final_load = background_load()

    table = Table(title=f"Relay RSS with {args.messages:,} messages queued (delivery on)")
    for column in (
        "spool",
        "at ready MB",
        "peak MB",
        "final MB",
        "slope MB/min",
        "attempts",
        "other load",
        f"< {args.limit_mb:.0f} MB",
    ):
        table.add_column(column, justify="left" if column == "spool" else "right")
    for r in results:
        rss = r["rss_mb"]
        table.add_row(
            r["backend"],
            f"{rss['at_ready']:.0f}",
            f"{rss['peak']:.0f}",
            f"{rss['final']:.0f}",
            f"{rss['slope_mb_per_minute']:+.1f}",
            f"{r['delivery_attempts']:,}",
            f"{100 * r['load']['others']:.0f}%",
            "[green]yes[/green]" if r["under_limit"] else "[red]NO[/red]",
        )
    console.print(table)
    console.print(
        f"RSS is the sum over the relay's process tree ({args.processes} processes). Other work "
        f"on the machine: {100 * idle_load:.0f}% of all cores before, {100 * final_load:.0f}% "
        "after (idle readings)",
        style="yellow" if max(idle_load, final_load) > 0.1 else None,
    )
    write_json(
        args.out,
        {
            "benchmark": "memory",
            "generated_at": now_iso(),
            "machine": machine_info(
                background_load_before=idle_load, background_load_after=final_load
            ),
            "parameters": {
                "messages": args.messages,
                "message_bytes": SIZE,
                "seconds": args.seconds,
                "interval": args.interval,
                "relay_processes": args.processes,
                "limit_mb": args.limit_mb,
                "receivers": "half connection refused, half smtp-sink -r RCPT (4xx)",
            },
            "backends": results,
        },
    )
    return 0 if results and all(r["under_limit"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
