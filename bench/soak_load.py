"""An open-loop SMTP load generator for the soak: RATE messages per second for SECONDS, a new
plaintext connection per message (a network-bound tenant: no TLS, no AUTH), each message's
submission latency measured from connect to the 250 after its DATA.

Run as its own process so its CPU is not the benchmark's. Every INTERVAL seconds it prints one
JSON line: messages accepted and failed in the interval, p50/p99/max latency of the messages
that completed in it, connections in flight and how many starts were late (the in-flight cap
was reached); at the end one line with "final": true and the totals. Bounded by RATE×SECONDS
messages and by SECONDS + --drain seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.tls_load import build_message  # noqa: E402


class Refused(Exception):
    pass


async def _reply(reader: asyncio.StreamReader, expect: int) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise Refused("connection closed")
        if len(line) < 4 or line[3:4] != b"-":  # the last line of a reply
            break
    code = int(line[:3])
    if code != expect:
        raise Refused(f"{code} {line[4:].decode(errors='replace').strip()}"[:120])


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(p * (len(sorted_values) - 1))))
    return sorted_values[index]


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.accepted = 0
        self.failed = 0
        self.late = 0
        self.failures: dict[str, int] = {}

    def row(self) -> dict:
        values = sorted(self.latencies)
        return {
            "accepted": self.accepted,
            "failed": self.failed,
            "late": self.late,
            "p50_ms": 1000 * _percentile(values, 0.50),
            "p99_ms": 1000 * _percentile(values, 0.99),
            "max_ms": 1000 * (values[-1] if values else 0.0),
        }


async def run(args: argparse.Namespace) -> None:
    total = int(args.rate * args.seconds)
    interval_stats, all_stats = Stats(), Stats()
    all_latencies: list[float] = []
    in_flight = 0
    slot = asyncio.Semaphore(args.max_in_flight)

    async def submit(seq: int) -> None:
        nonlocal in_flight
        message = build_message(args.sender, args.recipient, args.size, seq)
        started = time.monotonic()
        writer = None
        accepted = False
        try:
            async with asyncio.timeout(args.timeout):
                reader, writer = await asyncio.open_connection(args.host, args.port)
                await _reply(reader, 220)
                writer.write(b"EHLO client.test\r\n")
                await _reply(reader, 250)
                writer.write(f"MAIL FROM:<{args.sender}>\r\n".encode())
                await _reply(reader, 250)
                writer.write(f"RCPT TO:<{args.recipient}>\r\n".encode())
                await _reply(reader, 250)
                writer.write(b"DATA\r\n")
                await _reply(reader, 354)
                writer.write(message + b".\r\n")
                await _reply(reader, 250)
                latency = time.monotonic() - started
                accepted = True
                for stats in (interval_stats, all_stats):
                    stats.accepted += 1
                    stats.latencies.append(latency)
                all_latencies.append(latency)
                writer.write(b"QUIT\r\n")
                await _reply(reader, 221)
        except (Refused, OSError, TimeoutError, ValueError) as exc:
            if not accepted:  # a QUIT that goes wrong after the 250 loses nothing
                key = f"{type(exc).__name__}: {exc}"[:120]
                for stats in (interval_stats, all_stats):
                    stats.failed += 1
                    stats.failures[key] = stats.failures.get(key, 0) + 1
        finally:
            if writer is not None:
                writer.close()
            in_flight -= 1
            slot.release()

    started = time.monotonic()
    deadline = started + args.seconds + args.drain
    tasks: set[asyncio.Task] = set()

    last_report = started

    def report() -> None:
        nonlocal interval_stats, last_report
        now = time.monotonic()
        row = interval_stats.row() | {
            "t": now - started,
            "span": now - last_report,
            "in_flight": in_flight,
        }
        interval_stats, last_report = Stats(), now
        print(json.dumps(row), flush=True)

    async def reporter() -> None:
        next_at = started + args.interval
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            report()
            next_at += args.interval

    report_task = asyncio.create_task(reporter())
    for seq in range(total):
        target = started + seq / args.rate
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > deadline:
            break
        if slot.locked():
            interval_stats.late += 1
            all_stats.late += 1
        await slot.acquire()
        in_flight += 1
        task = asyncio.create_task(submit(seq))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks), timeout=max(1.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - started
    report_task.cancel()
    if time.monotonic() - last_report >= 1.0:  # the last, partial interval
        report()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    values = sorted(all_latencies)
    print(
        json.dumps(
            {
                "final": True,
                "scheduled": total,
                "accepted": all_stats.accepted,
                "failed": all_stats.failed,
                "late": all_stats.late,
                "failures": all_stats.failures,
                "elapsed": elapsed,
                "p50_ms": 1000 * _percentile(values, 0.50),
                "p99_ms": 1000 * _percentile(values, 0.99),
                "max_ms": 1000 * (values[-1] if values else 0.0),
                "client_cpu_seconds": usage.ru_utime + usage.ru_stime,
                "unfinished": len(tasks),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--sender", required=True)
    parser.add_argument("--recipient", required=True)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--max-in-flight", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0, help="per message")
    parser.add_argument("--drain", type=float, default=90.0, help="after the last start")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
