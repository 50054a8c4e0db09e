"""Does the control plane slow the relay down? (issue 12: at most 5 % end to end.)

One delivering relay (`axiom relay`, AXIOM_RELAY_PROCESSES=3, bench/end_to_end.py's receiving
world: Knot and Postfix's smtp-sink) is timed end to end in rounds that alternate:

  quiet    — the relay alone;
  control  — the same relay while its control plane runs beside it on the same database: a
             Prefect server and `axiom flows serve` with every scheduled runbook on its real
             schedule (procedures-sweep and reactions-watch, every 60 s), as in production.

Rounds last about --seconds (default 60, so each control round sees the scheduled runs it
would see in production), the control plane is started before and stopped after each control
round, and the figure is the median ratio control/quiet over the pairs; every pair is printed.
Results go to bench/out/control_plane.json. Bounded in messages and time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
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
    DeliveringRelay,
    LoadMeter,
    ReceivingWorld,
    SpoolProbe,
    console,
    machine_info,
    now_iso,
    say,
    write_json,
)
from bench.end_to_end import RECEIVER, Setup, axiom_settle, check_setup, run_e2e  # noqa: E402
from testbed.axiom import AxiomProcess, descendants, log_says  # noqa: E402
from testbed.prefect import PrefectServer  # noqa: E402

OUT = OUT_DIR / "control_plane.json"


class ControlPlane:
    """A Prefect server and `axiom flows serve` on the relay's home, started and stopped."""

    def __init__(self, relay: DeliveringRelay):
        self.relay = relay
        self.server = PrefectServer()
        self.flows: AxiomProcess | None = None
        self.flow_runs = 0

    def start(self) -> None:
        self.server.start()
        env = self.relay.env | self.server.env | {"AXIOM_PREFECT_API_URL": self.server.api_url}
        self.flows = AxiomProcess(
            ["flows", "serve"],
            env,
            self.relay.home / "flows.log",
            ready=log_says(b"flows ready"),
        ).start(60)

    def pgids(self) -> list[int]:
        groups = []
        if self.server._proc is not None and self.server._proc.poll() is None:
            groups.append(self.server._proc.pid)
        if self.flows is not None and self.flows.running:
            groups.append(self.flows.pgid)
        return groups

    def scheduled_runs(self) -> int:
        """Flow runs that have completed on this server so far (its database outlives stop())."""
        completed = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        return int(self.server.post("/flow_runs/count", completed))  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.flows is not None:
            for pid in descendants(self.flows.pid or 0):  # a flow run still going
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.flows.stop()
            self.flows = None
        self.server.stop()

    def destroy(self) -> None:
        self.stop()
        self.server.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds (quiet, control)")
    parser.add_argument("--seconds", type=float, default=60.0, help="target length of a round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-messages", type=int, default=60000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    say("control-plane benchmark: the relay end to end, alone and beside its control plane")
    with ExitStack() as stack:
        world = ReceivingWorld([RECEIVER])
        stack.callback(world.stop)
        world.start()
        relay = DeliveringRelay(3, world.env, domain=DOMAIN)
        stack.callback(relay.remove)
        relay.provision()
        stack.callback(relay.stop)
        relay.start()
        probe = SpoolProbe(relay.db_url)
        stack.callback(probe.close)
        control = ControlPlane(relay)
        stack.callback(control.destroy)
        setup = Setup(
            "axiom_3",
            "Axiom (3 processes)",
            relay.port,
            lambda: [relay.pgid],
            axiom_settle(probe),
            probe,
        )
        meter = LoadMeter(lambda: [*world.pgids(), relay.pgid, *control.pgids()])
        check_setup(setup, world)
        warm = run_e2e(setup, world, meter, args.warmup, "warm-up")
        if not warm.ok:
            raise RuntimeError(f"warm-up failed: {warm.detail}")
        count = max(1000, min(args.max_messages, int(warm.rate * args.seconds)))
        pairs = []
        for round_no in range(1, args.rounds + 1):
            say(f"round {round_no}/{args.rounds}: {count} messages each way")
            quiet = run_e2e(setup, world, meter, count, "quiet")
            control.start()
            try:
                # Steady state: Prefect's scheduler has made the schedules' runs and the runner
                # has run at least one, as it does every minute in production.
                before = control.scheduled_runs()
                deadline = time.monotonic() + 150
                while control.scheduled_runs() == before and time.monotonic() < deadline:
                    time.sleep(2)
                busy = run_e2e(setup, world, meter, count, "control")
                scheduled = control.scheduled_runs() - before
            finally:
                control.stop()
            pairs.append(
                {
                    "quiet": quiet.as_dict(),
                    "control": busy.as_dict(),
                    "ratio": busy.rate / quiet.rate if quiet.rate else 0.0,
                    "completed_flow_runs": scheduled,
                }
            )
            say(
                f"  ratio control/quiet {pairs[-1]['ratio']:.3f}; {scheduled} flow run(s) completed"
            )
    ratios = [p["ratio"] for p in pairs]
    document = {
        "when": now_iso(),
        "machine": machine_info(),
        "messages_per_round": count,
        "pairs": pairs,
        "median_ratio": statistics.median(ratios) if ratios else 0.0,
        "bar": 0.95,
    }
    write_json(args.out, document)
    table = Table("round", "quiet msg/s", "with control plane msg/s", "ratio", "flow runs")
    for n, p in enumerate(pairs, 1):
        table.add_row(
            str(n),
            f"{p['quiet']['rate']:.0f}",
            f"{p['control']['rate']:.0f}",
            f"{p['ratio']:.3f}",
            str(p["completed_flow_runs"]),
        )
    console.print(table)
    console.print(
        f"median ratio {document['median_ratio']:.3f} (bar: at least 0.95); {args.out}",
        highlight=False,
    )
    return 0 if document["median_ratio"] >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
