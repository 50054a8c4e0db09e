"""Instructions per accepted message: a CPU figure that does not move with the machine's load.

On a shared 2-core machine the rates of bench/submission.py move by ±20 % from one minute to
the next, so a change worth 5 % cannot be seen in them. Valgrind's callgrind counts the
instructions a process executes, which is the same for the same code and inputs whatever else
the machine is doing. This runs `axiom relay` (one process, delivery off) under callgrind,
warms it up with smtp-source, resets the counters, sends --messages 2 KB messages (20 sessions,
one connection per message) and reads the count: user-space instructions of the whole relay
process per accepted message (kernel time is not counted).

    .venv/bin/python -m bench.instructions                   # the working tree
    .venv/bin/python -m bench.instructions --against HEAD~3  # and another revision, side by side

--against (repeatable) checks the revision out into a temporary git worktree and runs it the
same way (its code first on PYTHONPATH); a directory is taken as a checkout as it is. Results
go to the terminal and bench/out/instructions.json. Group commit batches differ with timing,
so repeated runs differ by about 1 %.

--end-to-end turns delivery on: the relay (still one process, so callgrind sees all of it)
delivers to Postfix's smtp-sink through Knot, as bench/end_to_end.py does, and the count runs
until the sink has every message: accept, sign, spool, claim, deliver and settle.

--processes N (with --end-to-end) runs the multi-process layout (AXIOM_RELAY_PROCESSES=N: N-1
listener processes and the delivering main process). Only the main process runs under
callgrind: the listeners run at full speed, as in production, and the count is the delivering
process's instructions per delivered message. --trace-children counts the listeners too (on a
busy machine a listener under callgrind may not start within the 60 s relay.service allows).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import DeliveringRelay, Receiver, ReceivingWorld  # noqa: E402
from bench.process_cpu import worktrees  # noqa: E402
from bench.setups import VENV_BIN, AxiomRelay, smtp_source  # noqa: E402

OUT = ROOT / "bench" / "out" / "instructions.json"
# the end-to-end benchmark's receiver: its MX is named under comcast.net (bench/end_to_end.py)
E2E_RECEIVER = Receiver("comcast.net", "mx1.comcast.net", "127.0.90.1")
SENDER = "bench@bench.test"
console = Console()


def callgrind_relay(
    code: Path | None,
    out: Path,
    world: ReceivingWorld | None,
    processes: int = 1,
    trace_children: bool = False,
) -> AxiomRelay:
    # python -c, not the axiom script: callgrind follows the interpreter, not a wrapper.
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}.%p",
        *(["--trace-children=yes"] if trace_children else []),
        str(VENV_BIN / "python"),
        "-c",
        "import sys; from axiom.cli import main; sys.argv = ['axiom', 'relay']; main()",
    ]
    if world is None:
        return AxiomRelay(processes, command=command, code=code)
    return DeliveringRelay(processes, world.env, command=command, code=code)


def group_pids(pgid: int) -> list[int]:
    """Every live process of the group (the relay and its listener processes)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return sorted(pids)


def _under_callgrind(pid: int) -> bool:
    try:
        return "callgrind" in os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False


def dump(pgid: int, label: str) -> None:
    for pid in group_pids(pgid):
        if not _under_callgrind(pid):
            continue  # a listener running natively (only the main process is counted)
        result = subprocess.run(
            ["callgrind_control", f"--dump={label}", str(pid)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"callgrind_control failed: {result.stdout}{result.stderr}")


def instructions_in(out: Path, label: str) -> dict[int, int]:
    """pid -> instruction total of the dumps that callgrind_control --dump=label wrote."""
    found: dict[int, int] = {}
    for name in sorted(glob.glob(f"{out}*")):
        text = Path(name).read_text(errors="replace")
        if f"Trigger: dump {label}\n" in text:
            pid = total = None
            for line in text.splitlines():
                if line.startswith("pid:"):
                    pid = int(line.split()[1])
                elif line.startswith("summary:"):
                    total = int(line.split()[1])
            if pid is not None and total is not None:
                found[pid] = found.get(pid, 0) + total
    if not found:
        raise RuntimeError(f"no callgrind dump labelled {label} in {out}*")
    return found


def measure(
    name: str,
    code: Path | None,
    messages: int,
    workdir: Path,
    world: ReceivingWorld | None,
    processes: int = 1,
    trace_children: bool = False,
) -> dict:
    out = workdir / f"callgrind-{name.replace(' ', '-').replace('/', '_')}.out"
    relay = callgrind_relay(code, out, world, processes, trace_children)
    sink = world.sinks[E2E_RECEIVER.domain] if world is not None else None
    rcpt = {"recipient": f"rcpt@{E2E_RECEIVER.domain}"} if world is not None else {}

    def delivered(count: int) -> None:
        if sink is not None and sink.wait_for(count, timeout=1800) is None:
            raise RuntimeError(f"{name}: the sink got {sink.delivered()} of {count}")

    base = sink.delivered() if sink is not None else 0
    try:
        relay.provision()
        console.print(f"[dim]{name}: starting axiom relay under callgrind (slow: ~30 s)[/dim]")
        relay.start(timeout=600)
        _, ok, detail = smtp_source(
            relay.port, 100, sessions=10, sender=SENDER, timeout=600, **rcpt
        )
        if not ok:
            raise RuntimeError(f"{name}: warm-up failed: {detail}\n{relay.log.read_text()}")
        delivered(base + 100)
        dump(relay.pgid, "warm")  # a dump also resets the counters
        time.sleep(0.5)
        started = time.monotonic()
        _, ok, detail = smtp_source(
            relay.port, messages, sessions=20, sender=SENDER, timeout=1800, **rcpt
        )
        if not ok:
            raise RuntimeError(f"{name}: load failed: {detail}")
        delivered(base + 100 + messages)
        elapsed = time.monotonic() - started
        dump(relay.pgid, "load")
        time.sleep(1)
        spooled = relay.spool_count()
        if spooled != 100 + messages:
            raise RuntimeError(f"{name}: {spooled} spooled, {100 + messages} accepted")
        per_pid = instructions_in(out, "load")
        main_pid = relay.pgid
    finally:
        relay.stop()
        relay.remove()
    total = sum(per_pid.values())
    main = per_pid.get(main_pid, 0)
    return {
        "name": name,
        "messages": messages,
        "spooled": spooled,
        "processes": processes,
        "instructions": total,
        "instructions_per_message": total / messages,
        "main_per_message": main / messages,
        "listeners_per_message": (total - main) / messages,
        "seconds_under_callgrind": round(elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        help="a git revision to measure beside the working tree (may be repeated)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--end-to-end", action="store_true", help="delivery on, to smtp-sink; count until sunk"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="AXIOM_RELAY_PROCESSES (with --end-to-end)"
    )
    parser.add_argument(
        "--trace-children", action="store_true", help="count the listener processes too"
    )
    args = parser.parse_args()
    if args.processes != 1 and not args.end_to_end:
        parser.error("--processes needs --end-to-end (without delivery the parent only waits)")
    if not 50 <= args.messages <= 20000:
        parser.error(f"--messages {args.messages}: between 50 and 20000")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        console.print("[red]valgrind (callgrind) is required: apt-get install valgrind[/red]")
        return 2

    results = []
    with (
        tempfile.TemporaryDirectory(prefix="axiom-instructions-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        trees: list[tuple[str, Path | None]] = [("working tree", None)]
        trees[:0] = worktrees(args.against, Path(workdir), stack)
        world = None
        if args.end_to_end:
            world = ReceivingWorld([E2E_RECEIVER])
            stack.callback(world.stop)
            world.start()
        for name, code in trees:
            results.append(
                measure(
                    name,
                    code,
                    args.messages,
                    workdir,
                    world,
                    args.processes,
                    args.trace_children,
                )
            )

    what = "delivered" if args.end_to_end else "accepted"
    table = Table(title=f"user-space instructions per {what} message ({args.messages} × 2 KB)")
    table.add_column("code")
    table.add_column("M instructions / message", justify="right")
    table.add_column("× first", justify="right")
    if args.processes > 1:
        table.add_column("main", justify="right")
        table.add_column("listeners", justify="right")
    for r in results:
        ratio = r["instructions_per_message"] / results[0]["instructions_per_message"]
        row = [r["name"], f"{r['instructions_per_message'] / 1e6:.2f}", f"{ratio:.3f}"]
        if args.processes > 1:
            row += [f"{r['main_per_message'] / 1e6:.2f}", f"{r['listeners_per_message'] / 1e6:.2f}"]
        table.add_row(*row)
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
