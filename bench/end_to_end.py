"""End-to-end benchmark: messages/s from submission until a receiver (Postfix's smtp-sink)
has accepted them, 2 KB messages, smtp-source with 20 concurrent sessions and a new
connection per message, side by side in the same run:

  1. Axiom (`axiom relay`, fresh AXIOM_HOME, network-bound tenant, delivery on,
     AXIOM_RELAY_PROCESSES=1, and =3: two listener processes and a main process that
     delivers): policy checks, RSA-2048 + Ed25519 DKIM signatures, a
     durable spool commit before every 250, then MX lookup through Knot (AXIOM_DNS_NAMESERVERS)
     and SMTP delivery to the sink on AXIOM_DELIVERY_PORT;
  2. Postfix relaying everything to the same sink (relayhost).

A run's time goes from the start of smtp-source until the sink's counter (smtp-sink -c) shows
every message of the run; the rate is messages / that time. Between runs each system's queue
is emptied (Axiom: no recipient left queued; Postfix: queue directories empty), so no run pays
for the previous one. Every setup is checked before it is timed, warmed up, then timed ROUNDS
times in turn; the figure is the median. Results go to the terminal and to
bench/out/end_to_end.json. Every run is bounded in messages and seconds.

The sink's MX host is named under comcast.net, so Axiom's shaping for it is the Comcast entry
of runbooks/shaping.yaml: 25 concurrent sessions, 1,000 messages per session, no per-minute
cap (Postfix's default is 20 concurrent sessions per destination, no rate cap). A receiver no
provider entry claims gets the default, 600 messages per minute per source IP: at most 10
msg/s from the default pool's one address, a pacing policy rather than a throughput figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.common import (  # noqa: E402
    DOMAIN,
    OUT_DIR,
    SENDER,
    SESSIONS,
    SIZE,
    DeliveringRelay,
    LoadMeter,
    Receiver,
    ReceivingWorld,
    SpoolProbe,
    console,
    machine_info,
    now_iso,
    say,
    write_json,
)
from bench.setups import background_load, group_cpu_seconds, smtp_source  # noqa: E402
from testbed.postfix import PostfixInstance, relay_to  # noqa: E402

RCPT_DOMAIN = "comcast.net"
RECEIVER = Receiver(RCPT_DOMAIN, "mx1.comcast.net", "127.0.90.1")
RECIPIENT = f"rcpt@{RCPT_DOMAIN}"
OUT = OUT_DIR / "end_to_end.json"


@dataclass
class Run:
    messages: int
    submit_seconds: float  # until smtp-source had every 250
    e2e_seconds: float  # until the sink had every message
    server_cpu: float
    machine_busy: float
    other_load: float
    ok: bool
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.e2e_seconds if self.ok and self.e2e_seconds else 0.0

    @property
    def submit_rate(self) -> float:
        return self.messages / self.submit_seconds if self.ok and self.submit_seconds else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.server_cpu / self.messages if self.messages else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {
            "rate": self.rate,
            "submit_rate": self.submit_rate,
            "cpu_ms_per_message": self.cpu_ms_per_message,
        }


@dataclass
class Setup:
    key: str
    title: str
    port: int
    pgids: object  # () -> list[int]: the system under test
    settle: object  # (timeout) -> None: its queue is empty
    probe: SpoolProbe | None = None  # Axiom's spool
    runs: list[Run] = field(default_factory=list)
    count: int = 0
    sent: int = 0

    def median(self, attr: str) -> float:
        values = [getattr(r, attr) for r in self.runs if r.ok]
        return statistics.median(values) if values else 0.0

    @property
    def rate(self) -> float:
        return self.median("rate")


def axiom_settle(probe: SpoolProbe):
    def settle(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (queued := probe.states().get("queued", 0)) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Axiom: {queued} recipient(s) still queued after {timeout}s")
            time.sleep(0.1)

    return settle


def postfix_settle(instance: PostfixInstance):
    return lambda timeout: instance.wait_until_queue_empty(timeout=timeout)


def run_e2e(setup: Setup, world: ReceivingWorld, meter: LoadMeter, count: int, label: str) -> Run:
    sink = world.sinks[RCPT_DOMAIN]
    before = sink.delivered()
    meter.sample()
    cpu0 = group_cpu_seconds(setup.pgids())
    started = time.monotonic()

    def progress(done: int) -> None:
        say(f"    {setup.title}: {done}/{count} accepted, {sink.delivered() - before} delivered")

    sent, ok, detail = smtp_source(
        setup.port,
        count,
        sessions=SESSIONS,
        size=SIZE,
        sender=SENDER,
        recipient=RECIPIENT,
        timeout=180,
        progress=progress,
    )
    submitted = time.monotonic()
    done_at = None
    if ok:
        # bounded: at least a minute, or four times the submission's time
        done_at = sink.wait_for(before + count, timeout=max(60.0, 4 * (submitted - started)))
        if done_at is None:
            ok, detail = False, f"the sink got {sink.delivered() - before}/{count} in time"
    ended = done_at or time.monotonic()
    cpu1 = group_cpu_seconds(setup.pgids())
    load = meter.sample()
    setup.sent += sent
    run = Run(
        sent,
        submitted - started,
        ended - started,
        cpu1 - cpu0,
        load.machine,
        load.others,
        ok,
        detail,
    )
    status = f"{run.rate:7.0f} msg/s" if ok else f"[red]FAILED[/red] {detail}"
    say(
        f"  {label:8} {setup.title:22} {sent:6d} msgs: accepted in {run.submit_seconds:5.1f}s, "
        f"at the sink in {run.e2e_seconds:5.1f}s {status}  server CPU "
        f"{run.cpu_ms_per_message:.2f} ms/msg, {load.text()}"
    )
    setup.settle(120)
    return run


def check_setup(setup: Setup, world: ReceivingWorld) -> None:
    sink = world.sinks[RCPT_DOMAIN]
    before = sink.delivered()
    sent, ok, detail = smtp_source(
        setup.port, 1, sessions=1, sender=SENDER, recipient=RECIPIENT, timeout=30
    )
    if not ok:
        raise RuntimeError(f"{setup.title} refused smtp-source's message: {detail}")
    setup.sent += sent
    if sink.wait_for(before + 1, timeout=60) is None:
        raise RuntimeError(f"{setup.title}: the check message never reached the sink")
    setup.settle(60)
    if setup.probe is not None:  # Axiom: delivered, shaped as Comcast, through the MX
        with setup.probe.engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT category, provider, mx_host FROM deliveryevent ORDER BY id DESC LIMIT 1"
                )
            ).one()
        if tuple(row) != ("delivered", "comcast", RECEIVER.mx_host):
            raise RuntimeError(f"{setup.title}: unexpected delivery event {tuple(row)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per setup")
    parser.add_argument("--seconds", type=float, default=10.0, help="target length of a run")
    parser.add_argument("--warmup", type=int, default=300, help="messages before timing")
    parser.add_argument("--max-messages", type=int, default=20000)
    parser.add_argument("--processes", default="1,3", help="AXIOM_RELAY_PROCESSES values")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        console.print("[red]The Postfix setup needs root (a private Postfix instance).[/red]")
        return 2
    processes = [int(p) for p in args.processes.split(",") if p.strip()]

    say(
        f"end-to-end benchmark: {SIZE} B messages, {SESSIONS} concurrent sessions, a new "
        f"connection per message, submission → relay → smtp-sink, {os.cpu_count()} CPUs"
    )
    idle_load = background_load()
    say(f"background load before starting: {100 * idle_load:.0f}% of all cores")
    if idle_load > 0.1:
        say("[yellow]other work is using the CPUs; every figure below will be lower[/yellow]")

    with ExitStack() as stack:
        say(f"starting Knot (MX {RCPT_DOMAIN} → {RECEIVER.mx_host}) and smtp-sink")
        world = ReceivingWorld([RECEIVER])
        stack.callback(world.stop)
        world.start()
        say(f"  sink on {RECEIVER.address}:{world.port}, Knot on {world.knot.nameserver}")

        postfix = relay_to(
            RECEIVER.address, world.port, name="bench-e2e-postfix", hostname="postfix-e2e.test"
        )
        stack.callback(postfix.stop)
        postfix.start()

        relays: dict[int, DeliveringRelay] = {}
        probes: dict[int, SpoolProbe] = {}
        for p in processes:
            say(f"provisioning Axiom (AXIOM_RELAY_PROCESSES={p}, delivery on) with the axiom CLI")
            relay = DeliveringRelay(p, world.env, domain=DOMAIN)
            stack.callback(relay.remove)
            relay.provision()
            stack.callback(relay.stop)
            relay.start()
            relays[p] = relay
            probes[p] = SpoolProbe(relay.db_url)
            stack.callback(probes[p].close)

        setups = [
            Setup(
                f"axiom_{p}",
                f"Axiom ({p} process{'es' if p > 1 else ''})",
                relays[p].port,
                (lambda r=relays[p]: [r.pgid]),
                axiom_settle(probes[p]),
                probes[p],
            )
            for p in processes
        ]
        setups.append(
            Setup(
                "postfix",
                "Postfix",
                postfix.port,
                lambda: [postfix.master_pid],
                postfix_settle(postfix),
            )
        )

        def all_pgids() -> list[int]:
            groups = world.pgids()
            for setup in setups:
                groups += [g for g in setup.pgids() if g]
            return groups

        meter = LoadMeter(all_pgids)

        say("checking every setup: one message each must reach the sink")
        for setup in setups:
            check_setup(setup, world)

        say(f"warm-up: {args.warmup} messages each (also sizes the timed runs)")
        for setup in setups:
            warm = run_e2e(setup, world, meter, args.warmup, "warm-up")
            if not warm.ok:
                raise RuntimeError(f"{setup.title} failed its warm-up: {warm.detail}")
            setup.count = max(500, min(args.max_messages, int(warm.rate * args.seconds)))

        for round_no in range(1, args.rounds + 1):
            say(f"round {round_no}/{args.rounds}")
            for setup in setups:
                setup.runs.append(run_e2e(setup, world, meter, setup.count, f"run {round_no}"))

        # Nothing lost, nothing twice: the sink got exactly what was submitted, and every
        # recipient Axiom accepted is delivered.
        sink_total = world.sinks[RCPT_DOMAIN].delivered()
        submitted_total = sum(s.sent for s in setups)
        delivered_in_spool = {p: probes[p].states() for p in processes}
        consistent = sink_total == submitted_total and all(
            delivered_in_spool[p].get("delivered", 0)
            == next(s.sent for s in setups if s.key == f"axiom_{p}")
            and set(delivered_in_spool[p]) <= {"delivered"}
            for p in processes
        )
        if not consistent:
            say(
                f"[red]the sink counted {sink_total}, {submitted_total} were submitted; "
                f"Axiom spools: {delivered_in_spool}[/red]"
            )
        final_load = background_load()

    report(setups, args, (idle_load, final_load), consistent, sink_total, submitted_total)
    return 0 if consistent and all(s.runs and all(r.ok for r in s.runs) for s in setups) else 1


def report(setups, args, load, consistent: bool, sink_total: int, submitted: int) -> dict:
    by_key = {s.key: s for s in setups}
    postfix = by_key["postfix"].rate
    table = Table(
        title=f"End to end: {SIZE} B messages, {SESSIONS} sessions, submission → smtp-sink",
        caption=f"median of {args.rounds} runs; × Postfix = this setup's rate / Postfix's",
    )
    for column in (
        "setup",
        "end-to-end msg/s",
        "accepted msg/s",
        "server CPU ms/msg",
        "other load",
        "× Postfix",
    ):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for s in setups:
        table.add_row(
            s.title,
            f"{s.rate:,.0f}",
            f"{s.median('submit_rate'):,.0f}",
            f"{s.median('cpu_ms_per_message'):.2f}",
            f"{100 * s.median('other_load'):.0f}%",
            f"{s.rate / postfix:.2f}" if postfix else "-",
        )
    console.print(table)
    console.print(
        f"other work on the machine: {100 * load[0]:.0f}% of all cores before, "
        f"{100 * load[1]:.0f}% after (idle readings); 'other load' is the share of all "
        "cores busy with processes not in this benchmark during the runs",
        style="yellow" if max(load) > 0.1 else None,
    )
    console.print(
        f"sink total {sink_total} = submitted {submitted}: "
        + ("[green]yes[/green]" if consistent else "[red]NO[/red]")
    )
    data = {
        "benchmark": "end_to_end",
        "generated_at": now_iso(),
        "machine": machine_info(background_load_before=load[0], background_load_after=load[1]),
        "parameters": {
            "message_bytes": SIZE,
            "sessions": SESSIONS,
            "connection_per_message": True,
            "rounds": args.rounds,
            "warmup_messages": args.warmup,
            "load_generator": "smtp-source",
            "receiver": "smtp-sink -c",
            "axiom_shaping_provider": "comcast (25 sessions, 1000 per session, no rate cap)",
            "postfix": "relayhost to the sink, default concurrency (20 per destination)",
        },
        "setups": {
            s.key: {
                "title": s.title,
                "rate": s.rate,
                "submit_rate": s.median("submit_rate"),
                "messages_per_run": s.count,
                "runs": [r.as_dict() for r in s.runs],
            }
            for s in setups
        },
        "ratios": {
            f"{s.key}_vs_postfix": (s.rate / postfix if postfix else None)
            for s in setups
            if s.key != "postfix"
        },
        "sink_matches_submitted": consistent,
    }
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    sys.exit(main())
