"""Bounded soak: `axiom relay` (delivery on) fed for SOAK_MINUTES at half the measured peak
rate, delivering to Postfix's smtp-sink through Knot MX records, one table row every INTERVAL
seconds: accepted/s, delivered/s, p50/p99 submission latency (connect → 250 after DATA,
measured per message by bench/soak_load.py), RSS of the relay's process tree, the backlog, and
other work on the machine. RSS is also sampled every few seconds between rows; it must not
grow without bound: the mean of the last third of the samples is compared with the middle
third's, and the least-squares slope over the last two thirds (MB/min) must stay under
MAX_SLOPE.

The peak is the end-to-end rate (submission until the sink has the message) of Axiom measured
in the same `make bench` run by bench/end_to_end.py (passed as --peak-rate); run alone, the
soak measures it first on its own relay the same way. After the load stops, the soak waits
(bounded) until the sink has every accepted message. Results: terminal and
bench/out/soak.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402

from bench.common import (  # noqa: E402
    DOMAIN,
    OUT_DIR,
    SENDER,
    SIZE,
    DeliveringRelay,
    LoadMeter,
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
from bench.end_to_end import (  # noqa: E402
    RCPT_DOMAIN,
    RECEIVER,
    RECIPIENT,
    Setup,
    axiom_settle,
    check_setup,
    run_e2e,
)
from bench.setups import background_load  # noqa: E402

OUT = OUT_DIR / "soak.json"
RSS_EVERY = 5.0  # seconds between RSS samples
HEADER = (
    f"{'time':>6} {'accepted/s':>10} {'delivered/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'RSS MB':>7} {'queued':>7} {'late':>5} {'failed':>6} {'other load':>10}"
)


def measure_peak(relay: DeliveringRelay, world: ReceivingWorld, probe: SpoolProbe) -> float:
    """Axiom's end-to-end rate on this relay, as bench/end_to_end.py measures it."""
    setup = Setup(
        f"axiom_{relay.processes}",
        f"Axiom ({relay.processes})",
        relay.port,
        lambda: [relay.pgid],
        axiom_settle(probe),
        probe,
    )
    meter = LoadMeter(lambda: [relay.pgid, *world.pgids()])
    warm = run_e2e(setup, world, meter, 300, "warm-up")
    if not warm.ok:
        raise RuntimeError(f"warm-up failed: {warm.detail}")
    count = max(500, min(20000, int(warm.rate * 10)))
    run = run_e2e(setup, world, meter, count, "peak")
    if not run.ok:
        raise RuntimeError(f"peak measurement failed: {run.detail}")
    return run.rate


MAX_SLOPE = 0.5  # MB/min over the last two thirds: 30 MB an hour would not be "bounded"


def rss_verdict(samples: list[RssSample]) -> dict:
    """Bounded if the last third's mean is within max(5 MB, 2 %) of the middle third's and the
    slope over the last two thirds (the first third is warm-up: caches, allocator arenas) is
    at most MAX_SLOPE. The leak this found (a task per idle spell of the delivery loop) grew
    ~1.8 MB/min at 70 msg/s, +6 MB between those thirds in 10 minutes."""
    values = [(s.at, s.total_mb) for s in samples]
    third = max(1, len(values) // 3)
    middle = [v for _, v in values[third : 2 * third]] or [v for _, v in values]
    last = [v for _, v in values[2 * third :]] or [v for _, v in values]
    middle_mean, last_mean = statistics.mean(middle), statistics.mean(last)
    growth = last_mean - middle_mean
    allowed = max(5.0, 0.02 * middle_mean)
    slope = slope_per_minute(values[third:])
    return {
        "first_mb": values[0][1] if values else 0.0,
        "peak_mb": max((v for _, v in values), default=0.0),
        "final_mb": values[-1][1] if values else 0.0,
        "middle_third_mean_mb": middle_mean,
        "last_third_mean_mb": last_mean,
        "growth_mb": growth,
        "allowed_growth_mb": allowed,
        "slope_mb_per_minute": slope,
        "max_slope_mb_per_minute": MAX_SLOPE,
        "bounded": growth <= allowed and slope <= MAX_SLOPE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between rows")
    parser.add_argument("--rate", type=float, help="messages/s (default: half the peak)")
    parser.add_argument("--peak-rate", type=float, help="peak msg/s measured elsewhere")
    parser.add_argument("--peak-source", default="given on the command line")
    parser.add_argument("--processes", type=int, default=3, help="AXIOM_RELAY_PROCESSES")
    parser.add_argument("--drain-seconds", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seconds = args.soak_minutes * 60

    say(
        f"soak: {args.soak_minutes:g} min at half the peak rate, a row every "
        f"{args.interval:g}s, {SIZE} B messages, a new connection per message, "
        f"{os.cpu_count()} CPUs"
    )
    idle_load = background_load()
    say(f"background load before starting: {100 * idle_load:.0f}% of all cores")

    with ExitStack() as stack:
        world = ReceivingWorld([RECEIVER])
        stack.callback(world.stop)
        world.start()
        sink = world.sinks[RCPT_DOMAIN]
        relay = DeliveringRelay(args.processes, world.env, domain=DOMAIN)
        stack.callback(relay.remove)
        say(f"provisioning Axiom (AXIOM_RELAY_PROCESSES={args.processes}, delivery on)")
        relay.provision()
        stack.callback(relay.stop)
        relay.start()
        probe = SpoolProbe(relay.db_url)
        stack.callback(probe.close)
        check = Setup(
            "axiom", "Axiom", relay.port, lambda: [relay.pgid], axiom_settle(probe), probe
        )
        check_setup(check, world)

        if args.rate:
            rate, peak, peak_source = args.rate, 2 * args.rate, "--rate given"
        elif args.peak_rate:
            peak, peak_source = args.peak_rate, args.peak_source
            rate = peak / 2
        else:
            say("measuring the peak end-to-end rate on this relay first")
            peak, peak_source = measure_peak(relay, world, probe), "measured by the soak"
            rate = peak / 2
        say(
            f"peak {peak:.0f} msg/s ({peak_source}); soaking at {rate:.1f} msg/s for "
            f"{args.soak_minutes:g} min"
        )

        def pgids() -> list[int]:
            groups = [*world.pgids(), relay.pgid]
            if generator.poll() is None:
                groups.append(generator.pid)
            return groups

        delivered0 = sink.delivered()
        generator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.soak_load",
                "--port",
                str(relay.port),
                "--rate",
                str(rate),
                "--seconds",
                str(seconds),
                "--interval",
                str(args.interval),
                "--sender",
                SENDER,
                "--recipient",
                RECIPIENT,
                "--size",
                str(SIZE),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

        def kill_generator() -> None:
            if generator.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(generator.pid, signal.SIGKILL)
                generator.wait()

        stack.callback(kill_generator)
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            assert generator.stdout is not None
            for line in generator.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()

        meter = LoadMeter(pgids)
        started = time.monotonic()
        samples: list[RssSample] = []
        rows: list[dict] = []
        final: dict | None = None
        last_delivered = delivered0
        next_sample = started
        deadline = started + seconds + 90 + 60  # the generator's own drain bound, and slack
        console.print(HEADER, highlight=False)
        while time.monotonic() < deadline:
            if time.monotonic() >= next_sample:
                samples.append(sample_rss(relay.pid, started))
                next_sample += RSS_EVERY
            try:
                line = lines.get(timeout=max(0.05, next_sample - time.monotonic()))
            except queue.Empty:
                continue
            if line is None:
                break
            data = json.loads(line)
            if data.get("final"):
                final = data
                continue
            rss = sample_rss(relay.pid, started)
            samples.append(rss)
            delivered = sink.delivered()
            span = data["span"]
            load = meter.sample()
            row = {
                "t": data["t"],
                "accepted_per_s": data["accepted"] / span,
                "delivered_per_s": (delivered - last_delivered) / span,
                "p50_ms": data["p50_ms"],
                "p99_ms": data["p99_ms"],
                "max_ms": data["max_ms"],
                "failed": data["failed"],
                "late": data["late"],
                "in_flight": data["in_flight"],
                "rss_mb": rss.total_mb,
                "rss_largest_process_mb": rss.largest_mb,
                "queued": probe.states().get("queued", 0),
                "machine_load": load.machine,
                "other_load": load.others,
            }
            rows.append(row)
            last_delivered = delivered
            console.print(
                f"{row['t']:5.0f}s {row['accepted_per_s']:10.1f} {row['delivered_per_s']:11.1f} "
                f"{row['p50_ms']:8.0f} {row['p99_ms']:8.0f} {row['rss_mb']:7.0f} "
                f"{row['queued']:7d} {row['late']:5d} {row['failed']:6d} "
                f"{100 * row['other_load']:9.0f}%",
                highlight=False,
            )
        else:
            say("[red]the generator overran its bound; stopping it[/red]")
        kill_generator()
        if final is None:
            raise RuntimeError(
                f"the load generator ended without a summary:\n{generator.stderr.read()[-2000:]}"
            )

        accepted = final["accepted"]
        say(
            f"load done: {accepted} accepted, {final['failed']} failed, {final['late']} late "
            f"starts; waiting (≤ {args.drain_seconds:.0f}s) for the sink to have them all"
        )
        drain_started = time.monotonic()
        done_at = sink.wait_for(delivered0 + accepted, timeout=args.drain_seconds, poll=0.5)
        drain_seconds = (done_at or time.monotonic()) - drain_started
        with contextlib.suppress(RuntimeError):
            axiom_settle(probe)(30)
        at_sink = sink.delivered() - delivered0
        states = probe.states()
        samples.append(sample_rss(relay.pid, started))
        final_load = background_load()

    verdict = rss_verdict([s for s in samples if s.at <= seconds + 1] or samples)
    table = Table(
        title=f"Soak: {rate:.1f} msg/s (half of {peak:.0f}) for {args.soak_minutes:g} min"
    )
    for column in (
        "time",
        "accepted/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "RSS MB",
        "queued",
        "other load",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            f"{row['t']:.0f}s",
            f"{row['accepted_per_s']:.1f}",
            f"{row['delivered_per_s']:.1f}",
            f"{row['p50_ms']:.0f}",
            f"{row['p99_ms']:.0f}",
            f"{row['rss_mb']:.0f}",
            f"{row['queued']}",
            f"{100 * row['other_load']:.0f}%",
        )
    console.print(table)
    console.print(
        f"submission latency over the whole soak: p50 {final['p50_ms']:.0f} ms, p99 "
        f"{final['p99_ms']:.0f} ms, max {final['max_ms']:.0f} ms; {final['failed']} failed"
    )
    console.print(
        f"RSS: first {verdict['first_mb']:.0f} MB, peak {verdict['peak_mb']:.0f} MB, final "
        f"{verdict['final_mb']:.0f} MB; last third mean {verdict['last_third_mean_mb']:.1f} MB "
        f"vs middle third {verdict['middle_third_mean_mb']:.1f} MB "
        f"({verdict['growth_mb']:+.1f} MB, allowed {verdict['allowed_growth_mb']:.0f}); "
        f"slope over the last two thirds {verdict['slope_mb_per_minute']:+.2f} MB/min "
        f"(allowed {MAX_SLOPE}): "
        + ("[green]bounded[/green]" if verdict["bounded"] else "[red]GROWING[/red]")
    )
    console.print(
        f"the sink got {at_sink} of {accepted} accepted ("
        + ("[green]all[/green]" if at_sink == accepted else "[red]not all[/red]")
        + f") {drain_seconds:.0f}s after the load stopped; spool states {states}"
    )
    console.print(
        f"other work on the machine: {100 * idle_load:.0f}% of all cores before, "
        f"{100 * final_load:.0f}% after (idle readings); per row: 'other load'",
        style="yellow" if max(idle_load, final_load) > 0.1 else None,
    )
    write_json(
        args.out,
        {
            "benchmark": "soak",
            "generated_at": now_iso(),
            "machine": machine_info(
                background_load_before=idle_load, background_load_after=final_load
            ),
            "parameters": {
                "minutes": args.soak_minutes,
                "interval_seconds": args.interval,
                "rate": rate,
                "peak_rate": peak,
                "peak_source": peak_source,
                "relay_processes": args.processes,
                "message_bytes": SIZE,
                "load_generator": "bench/soak_load.py (asyncio, plaintext, network-bound)",
            },
            "rows": rows,
            "summary": final,
            "rss": verdict,
            "rss_samples": [{"at": s.at, "total_mb": s.total_mb} for s in samples],
            "delivered_at_sink": at_sink,
            "all_delivered": at_sink == accepted,
            "drain_seconds": drain_seconds,
            "spool_states_after": states,
        },
    )
    return 0 if verdict["bounded"] and at_sink == accepted and final["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
