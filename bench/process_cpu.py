"""CPU per delivered message of each relay process, end to end, old code against new.

bench.instructions counts one process under callgrind; the multi-process layout
(AXIOM_RELAY_PROCESSES > 1: listener processes and a delivering main process) and kernel time
are outside what it sees. This runs `axiom relay` with --processes processes, delivery on,
through Knot to smtp-sink as bench/end_to_end.py does, and reads each process's user and
system CPU from /proc before and after --messages messages (after a warm-up), until the sink
has every one. With --against REV (repeatable; a directory is taken as a checkout) each
revision runs from a temporary git worktree, and they alternate with the working tree for
--rounds rounds, so all see the same machine.

    .venv/bin/python -m bench.process_cpu --against def8f57 [--rounds 3] [--processes 3]

CPU time moves with the machine's load (caches, frequency) far less than a rate does, but it
still moves: compare codes within one run, never across runs. Results go to the terminal and
bench/out/process_cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402

from bench.common import DeliveringRelay, Receiver, ReceivingWorld, console  # noqa: E402
from bench.setups import CLK_TCK, machine_busy, smtp_source  # noqa: E402

OUT = ROOT / "bench" / "out" / "process_cpu.json"
RECEIVER = Receiver("comcast.net", "mx1.comcast.net", "127.0.90.1")
SENDER = "bench@bench.test"


def group_processes(pgid: int) -> dict[int, tuple[int, int]]:
    """pid -> (utime, stime) in clock ticks of every live process in the group."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found[int(entry.name)] = (int(fields[11]), int(fields[12]))
    return found


def worktrees(
    revisions: list[str], parent: Path, stack: contextlib.ExitStack
) -> list[tuple[str, Path]]:
    """Each revision checked out into a temporary git worktree under parent (removed when
    stack closes): (revision, its directory), in the order given. A revision that names an
    existing directory (a checkout with uncommitted changes) is used as it is."""
    trees = []
    for i, revision in enumerate(revisions):
        if Path(revision).is_dir():
            trees.append((revision, Path(revision).resolve()))
            continue
        tree = parent / f"against-{i}"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), revision],
            check=True,
            capture_output=True,
        )
        stack.callback(
            subprocess.run,
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
            capture_output=True,
        )
        trees.append((revision, tree))
    return trees


def one_run(name: str, code: Path | None, args, world: ReceivingWorld) -> dict:
    relay = DeliveringRelay(args.processes, world.env, code=code)
    sink = world.sinks[RECEIVER.domain]
    rcpt = f"rcpt@{RECEIVER.domain}"
    try:
        relay.provision()
        relay.start(timeout=120)
        base = sink.delivered()
        _, ok, detail = smtp_source(relay.port, args.warmup, sender=SENDER, recipient=rcpt)
        if not ok or sink.wait_for(base + args.warmup, timeout=300) is None:
            raise RuntimeError(f"{name}: warm-up failed: {detail}")
        time.sleep(1.5)  # the last settlements and lease renewals of the warm-up
        main_pid = relay.pgid  # the group leader: the delivering main process
        before = group_processes(main_pid)
        busy0, total0 = machine_busy()
        started = time.monotonic()
        _, ok, detail = smtp_source(
            relay.port, args.messages, sender=SENDER, recipient=rcpt, timeout=600
        )
        if not ok:
            raise RuntimeError(f"{name}: load failed: {detail}")
        if sink.wait_for(base + args.warmup + args.messages, timeout=600) is None:
            raise RuntimeError(f"{name}: the sink did not get every message")
        elapsed = time.monotonic() - started
        after = group_processes(main_pid)
        busy1, total1 = machine_busy()
    finally:
        relay.stop()
        relay.remove()
    per_process = []
    for pid, (u1, s1) in after.items():
        u0, s0 = before.get(pid, (0, 0))
        role = "main" if pid == main_pid else "listener"
        per_process.append(
            {
                "pid": pid,
                "role": role,
                "user_ms_per_msg": 1000 * (u1 - u0) / CLK_TCK / args.messages,
                "sys_ms_per_msg": 1000 * (s1 - s0) / CLK_TCK / args.messages,
            }
        )
    return {
        "code": name,
        "messages": args.messages,
        "seconds": round(elapsed, 2),
        "machine_busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
        "processes": per_process,
    }


def summary(runs: list[dict], role: str | None, field: str) -> float:
    values = []
    for run in runs:
        values.append(
            sum(
                p[f]
                for p in run["processes"]
                if role is None or p["role"] == role
                for f in ((field,) if field != "cpu" else ("user_ms_per_msg", "sys_ms_per_msg"))
            )
        )
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        help="a git revision to measure beside the working tree (may be repeated)",
    )
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the world on kill

    runs: list[dict] = []
    with (
        tempfile.TemporaryDirectory(prefix="axiom-process-cpu-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        trees: list[tuple[str, Path | None]] = [("working tree", None)]
        trees[:0] = worktrees(args.against, Path(tmp), stack)
        world = ReceivingWorld([RECEIVER])
        stack.callback(world.stop)
        world.start()
        for round_ in range(args.rounds):
            order = trees if round_ % 2 == 0 else list(reversed(trees))
            for name, code in order:
                run = one_run(name, code, args, world)
                runs.append(run)
                total = sum(p["user_ms_per_msg"] + p["sys_ms_per_msg"] for p in run["processes"])
                console.print(
                    f"round {round_ + 1} {name}: {total:.3f} ms CPU/msg "
                    f"({run['seconds']} s, machine {100 * run['machine_busy']:.0f}% busy)"
                )

    table = Table(title=f"CPU ms per delivered message, median of {args.rounds} rounds")
    table.add_column("code")
    for column in ("all", "user", "sys", "main", "main sys", "listeners", "listeners sys"):
        table.add_column(column, justify="right")
    for name, _ in trees:
        mine = [r for r in runs if r["code"] == name]
        table.add_row(
            name,
            f"{summary(mine, None, 'cpu'):.3f}",
            f"{summary(mine, None, 'user_ms_per_msg'):.3f}",
            f"{summary(mine, None, 'sys_ms_per_msg'):.3f}",
            f"{summary(mine, 'main', 'cpu'):.3f}",
            f"{summary(mine, 'main', 'sys_ms_per_msg'):.3f}",
            f"{summary(mine, 'listener', 'cpu'):.3f}",
            f"{summary(mine, 'listener', 'sys_ms_per_msg'):.3f}",
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
