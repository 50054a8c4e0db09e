"""Submission benchmark: accepted messages/s for 2 KB messages over 20 concurrent sessions,
a new connection per message, smtp-source as the load generator, against

  1. Axiom (`axiom relay`, fresh AXIOM_HOME, AXIOM_RELAY_PROCESSES=3 and =1): policy checks,
     RSA-2048 + Ed25519 DKIM signatures, and a durable spool commit before every 250;
  2. plain Postfix relaying to smtp-sink;
  3. Postfix + OpenDKIM (milter on a unix socket) signing RSA-2048, relaying to smtp-sink;

plus Axiom with STARTTLS + AUTH on every connection, driven by an aiosmtplib generator.

Each setup is checked before it is timed (Axiom spools signed mail, OpenDKIM signs, plain
Postfix does not), warmed up, then timed ROUNDS times in turn; the figure is the median.
Postfix keeps delivering to the sink while it accepts (as it would in production) and its
queue is drained between runs, so no run pays for the previous one. Results go to the
terminal and to bench/out/submission.json. Every run is bounded in messages and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # one Postfix-instance implementation: testbed/postfix.py

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.setups import (  # noqa: E402
    AxiomRelay,
    LoadResult,
    OpenDkim,
    background_load,
    measure,
    smtp_source,
)
from testbed.postfix import PostfixInstance, SmtpSink, relay_to  # noqa: E402

DOMAIN = "bench.test"
SENDER = f"bench@{DOMAIN}"  # smtp-source writes it into the header From too
SESSIONS = 20
# AXIOM_RELAY_PROCESSES for the multi-process setup: two listener processes (one per core)
# and the main process, which only delivers (accept-only here: it idles).
MULTI = 3
SIZE = 2048
OUT = ROOT / "bench" / "out" / "submission.json"

console = Console()
_t0 = time.monotonic()


def say(text: str) -> None:
    console.print(f"[dim]{time.monotonic() - _t0:6.1f}s[/dim] {text}", highlight=False)


@dataclass
class Setup:
    key: str
    title: str
    port: int
    pgids: object  # () -> list[int]
    drain: object = None  # () -> None, after each run
    runs: list[LoadResult] = field(default_factory=list)
    count: int = 0
    sent: int = 0

    @property
    def rate(self) -> float:
        ok = [r.rate for r in self.runs if r.ok]
        return statistics.median(ok) if ok else 0.0

    def median_of(self, attr: str) -> float:
        ok = [getattr(r, attr) for r in self.runs if r.ok]
        return statistics.median(ok) if ok else 0.0


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def postfix_to_sink(name: str, sink: SmtpSink, capture: SmtpSink, **main_cf) -> PostfixInstance:
    instance = relay_to(*sink.address, name=name, hostname=f"{name}.test", main_cf=main_cf)
    # Mail for verify.test goes to a capturing sink, so the set-up can be checked.
    table = instance.write_file("transport", f"verify.test smtp:[127.0.0.1]:{capture.port}\n")
    instance.main_cf_overrides["transport_maps"] = f"texthash:{table}"
    return instance


def check_postfix(instance: PostfixInstance, capture: SmtpSink, expect_dkim: bool) -> None:
    before = len(capture.messages())
    instance.submit(
        SENDER,
        ["check@verify.test"],
        f"From: <{SENDER}>\r\nTo: <check@verify.test>\r\nSubject: check\r\n\r\nbody\r\n",
    )
    messages = wait_for(
        lambda: capture.messages()[before:], 30, f"{instance.name}'s check message at the sink"
    )
    head = messages[-1].partition(b"\n\n")[0]
    signed = b"DKIM-Signature:" in head and f"d={DOMAIN}".encode() in head
    if signed != expect_dkim:
        raise RuntimeError(f"{instance.name}: DKIM-Signature expected={expect_dkim}:\n{head!r}")


def check_axiom(relay: AxiomRelay) -> None:
    before = relay.spool_count()
    _, ok, detail = smtp_source(relay.port, 1, sessions=1, sender=SENDER)
    if not ok:
        raise RuntimeError(f"axiom refused smtp-source's message: {detail}\n{relay.log}")
    if relay.spool_count() != before + 1:
        raise RuntimeError("axiom answered 250 but the message is not in the spool")
    head = relay.sample().partition(b"\r\n\r\n")[0]
    if head.count(b"DKIM-Signature:") != 2 or b"a=ed25519-sha256" not in head:
        raise RuntimeError(f"axiom's spooled message is not signed twice:\n{head!r}")


def run_load(setup: Setup, count: int, label: str, timeout: float) -> LoadResult:
    def progress(done: int) -> None:
        say(f"    {setup.title}: {done}/{count}")

    result = measure(
        lambda: smtp_source(
            setup.port,
            count,
            sessions=SESSIONS,
            size=SIZE,
            sender=SENDER,
            timeout=timeout,
            progress=progress,
        ),
        setup.pgids,
    )
    setup.sent += result.messages
    status = f"{result.rate:7.0f} msg/s" if result.ok else f"[red]FAILED[/red] {result.detail}"
    say(
        f"  {label:8} {setup.title:30} {result.messages:6d} msgs in {result.elapsed:5.1f}s "
        f"{status}  server CPU {result.cpu_ms_per_message:.2f} ms/msg, "
        f"machine {100 * result.machine_busy:.0f}% busy"
    )
    if setup.drain:
        setup.drain()
    return result


def tls_auth_load(relay: AxiomRelay, count: int, deadline: float) -> tuple[dict, LoadResult]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "tls_load.py"),
        "--port",
        str(relay.port),
        "--username",
        relay.username,
        "--password",
        relay.password,
        "--sender",
        SENDER,
        "--count",
        str(count),
        "--concurrency",
        str(SESSIONS),
        "--size",
        str(SIZE),
        "--deadline",
        str(deadline),
    ]
    holder: dict = {}

    def run() -> tuple[int, bool, str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline + 60)
        if proc.returncode != 0:
            return 0, False, proc.stderr[-2000:]
        holder.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        ok = holder["failed"] == 0 and holder["sent"] == count
        return holder["sent"], ok, json.dumps(holder["failures"])

    result = measure(run, lambda: [relay.pgid])
    relay_sent = holder.get("sent", 0)
    # The generator's own clock excludes its interpreter start-up.
    if holder.get("elapsed"):
        result.elapsed = holder["elapsed"]
    return {**holder, "relay_sent": relay_sent}, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per setup")
    parser.add_argument("--seconds", type=float, default=7.0, help="target length of a run")
    parser.add_argument("--warmup", type=int, default=300, help="messages before timing")
    parser.add_argument("--max-messages", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if os.geteuid() != 0:
        console.print("[red]The Postfix setups need root (private Postfix instances).[/red]")
        return 2

    say(
        f"submission benchmark: {SIZE} B messages, {SESSIONS} concurrent sessions, "
        f"a new connection per message, {os.cpu_count()} CPUs"
    )
    idle_load = background_load()
    say(f"background load before starting: {100 * idle_load:.0f}% of all cores")
    if idle_load > 0.1:
        say("[yellow]other work is using the CPUs; every figure below will be lower[/yellow]")
    with ExitStack() as stack:
        say("starting smtp-sink, Postfix, Postfix + OpenDKIM")
        sink = SmtpSink(backlog=1024, hostname="sink.test").start()
        stack.callback(sink.stop)
        capture = SmtpSink(capture=True, hostname="verify.test").start()
        stack.callback(capture.stop)

        postfix = postfix_to_sink("bench-postfix", sink, capture).start()
        stack.callback(postfix.stop)

        opendkim = OpenDkim(DOMAIN)
        stack.callback(opendkim.stop)  # registered first: a failed start cleans up too
        opendkim.start()
        postfix_dkim = postfix_to_sink(
            "bench-opendkim",
            sink,
            capture,
            smtpd_milters=f"unix:{opendkim.socket}",
            non_smtpd_milters="$smtpd_milters",
            milter_default_action="tempfail",  # an unsigned message must not pass as signed
        ).start()
        stack.callback(postfix_dkim.stop)

        relays = {}
        for processes in (MULTI, 1):
            say(f"provisioning Axiom (AXIOM_RELAY_PROCESSES={processes}) with the axiom CLI")
            relay = AxiomRelay(processes, domain=DOMAIN)
            stack.callback(relay.remove)
            relay.provision()
            stack.callback(relay.stop)
            relay.start()
            relays[processes] = relay

        say("checking every setup before timing it")
        check_postfix(postfix, capture, expect_dkim=False)
        check_postfix(postfix_dkim, capture, expect_dkim=True)
        for relay in relays.values():
            check_axiom(relay)
        spooled_before = {p: r.spool_count() for p, r in relays.items()}

        def drain(instance: PostfixInstance):
            return lambda: instance.wait_until_queue_empty(timeout=120)

        setups = [
            Setup(
                f"axiom_{MULTI}",
                f"Axiom ({MULTI} processes)",
                relays[MULTI].port,
                lambda: [relays[MULTI].pgid],
            ),
            Setup(
                "axiom_1",
                "Axiom (1 process)",
                relays[1].port,
                lambda: [relays[1].pgid],
            ),
            Setup(
                "postfix",
                "Postfix",
                postfix.port,
                lambda: [postfix.master_pid],
                drain(postfix),
            ),
            Setup(
                "postfix_opendkim",
                "Postfix + OpenDKIM (RSA-2048)",
                postfix_dkim.port,
                lambda: [postfix_dkim.master_pid, opendkim.pgid],
                drain(postfix_dkim),
            ),
        ]

        say(f"warm-up: {args.warmup} messages each (also sizes the timed runs)")
        for setup in setups:
            warm = run_load(setup, args.warmup, "warm-up", timeout=60)
            if not warm.ok:
                raise RuntimeError(f"{setup.title} failed its warm-up: {warm.detail}")
            setup.count = max(500, min(args.max_messages, int(warm.rate * args.seconds)))

        for round_no in range(1, args.rounds + 1):
            say(f"round {round_no}/{args.rounds}")
            for setup in setups:
                setup.runs.append(run_load(setup, setup.count, f"run {round_no}", timeout=90))

        say("Axiom with STARTTLS + AUTH on every connection (aiosmtplib, 20 concurrent)")
        tls_relay = relays[MULTI]
        warm_tls, _ = tls_auth_load(tls_relay, 200, deadline=60)
        tls_count = max(300, min(args.max_messages, int(warm_tls.get("rate", 0) * args.seconds)))
        tls_runs: list[tuple[dict, LoadResult]] = []
        for round_no in range(1, args.rounds + 1):
            detail, result = tls_auth_load(tls_relay, tls_count, deadline=90)
            tls_runs.append((detail, result))
            say(
                f"  run {round_no}  {result.messages} msgs in {result.elapsed:5.1f}s "
                f"{result.messages / result.elapsed if result.elapsed else 0:7.0f} msg/s"
                f"{'' if result.ok else ' [red]FAILED[/red] ' + result.detail}, "
                f"server CPU {result.cpu_ms_per_message:.2f} ms/msg, generator CPU "
                f"{detail.get('client_cpu_seconds', 0):.1f}s"
            )

        # Every 250 must be a spooled message: compare the spool with what was acknowledged.
        tls_sent = warm_tls.get("sent", 0) + sum(d.get("sent", 0) for d, _ in tls_runs)
        spool_ok = {}
        for processes, relay in relays.items():
            setup = next(s for s in setups if s.key == f"axiom_{processes}")
            expected = (
                spooled_before[processes] + setup.sent + (tls_sent if processes == MULTI else 0)
            )
            spool_ok[processes] = relay.spool_count() == expected
            if not spool_ok[processes]:
                say(
                    f"[red]spool of Axiom ({processes}) holds {relay.spool_count()}, "
                    f"expected {expected}[/red]"
                )

        final_load = background_load()
    report(setups, tls_runs, spool_ok, args, (idle_load, final_load))
    return 0 if all(s.runs and all(r.ok for r in s.runs) for s in setups) else 1


def report(setups: list[Setup], tls_runs, spool_ok, args, load: tuple[float, float]) -> None:
    by_key = {s.key: s for s in setups}
    axiom2, axiom1 = by_key[f"axiom_{MULTI}"].rate, by_key["axiom_1"].rate
    table = Table(
        title=f"Submission: {SIZE} B messages, {SESSIONS} sessions, new connection per message",
        caption=f"median of {args.rounds} runs; ratio = Axiom's rate / this setup's rate",
    )
    table.add_column("setup")
    table.add_column("msg/s", justify="right")
    table.add_column("server CPU ms/msg", justify="right")
    table.add_column("machine busy", justify="right")
    table.add_column(f"Axiom ({MULTI}) ×", justify="right")
    table.add_column("Axiom (1) ×", justify="right")
    for s in setups:
        table.add_row(
            s.title,
            f"{s.rate:,.0f}",
            f"{s.median_of('cpu_ms_per_message'):.2f}",
            f"{100 * s.median_of('machine_busy'):.0f}%",
            f"{axiom2 / s.rate:.2f}" if s.rate else "-",
            f"{axiom1 / s.rate:.2f}" if s.rate else "-",
        )
    console.print(table)
    console.print(
        f"other work on the machine: {100 * load[0]:.0f}% of all cores before, "
        f"{100 * load[1]:.0f}% after",
        style="yellow" if max(load) > 0.1 else None,
    )

    tls_rates = [r.messages / r.elapsed for _, r in tls_runs if r.elapsed and r.ok]
    tls_rate = statistics.median(tls_rates) if tls_rates else 0.0
    tls_cpu = statistics.median([r.cpu_ms_per_message for _, r in tls_runs]) if tls_runs else 0
    console.print(
        f"Axiom ({MULTI} processes) with STARTTLS + AUTH per connection (aiosmtplib, {SESSIONS} "
        f"concurrent): [bold]{tls_rate:,.0f} msg/s[/bold], server CPU {tls_cpu:.2f} ms/msg "
        f"({tls_rate / axiom2:.2f}× its plaintext rate)"
        if axiom2
        else "no plaintext Axiom rate to compare with"
    )

    postfix = by_key["postfix"].rate
    dkim = by_key["postfix_opendkim"].rate
    data = {
        "benchmark": "submission",
        "generated_at": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "background_load_before": load[0],
            "background_load_after": load[1],
        },
        "parameters": {
            "message_bytes": SIZE,
            "sessions": SESSIONS,
            "connection_per_message": True,
            "rounds": args.rounds,
            "warmup_messages": args.warmup,
            "load_generator": "smtp-source",
        },
        "setups": {
            s.key: {
                "title": s.title,
                "rate": s.rate,
                "messages_per_run": s.count,
                "runs": [
                    asdict(r) | {"rate": r.rate, "cpu_ms_per_message": r.cpu_ms_per_message}
                    for r in s.runs
                ],
            }
            for s in setups
        },
        "ratios": {
            f"axiom_{MULTI}_vs_postfix": axiom2 / postfix if postfix else None,
            f"axiom_{MULTI}_vs_postfix_opendkim": axiom2 / dkim if dkim else None,
            "axiom_1_vs_postfix": axiom1 / postfix if postfix else None,
            "axiom_1_vs_postfix_opendkim": axiom1 / dkim if dkim else None,
        },
        "axiom_starttls_auth": {
            "load_generator": "aiosmtplib",
            "processes": MULTI,
            "rate": tls_rate,
            "ratio_to_plaintext": tls_rate / axiom2 if axiom2 else None,
            "runs": [
                {
                    **detail,
                    "server_cpu": r.server_cpu,
                    "cpu_ms_per_message": r.cpu_ms_per_message,
                    "machine_busy": r.machine_busy,
                }
                for detail, r in tls_runs
            ],
        },
        "spool_matches_acknowledged": {f"axiom_{p}": ok for p, ok in spool_ok.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    say(
        f"results written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
    )


if __name__ == "__main__":
    sys.exit(main())
