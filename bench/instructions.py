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

--against checks the revision out into a temporary git worktree and runs it the same way
(its code first on PYTHONPATH). Results go to the terminal and bench/out/instructions.json.
Group commit batches differ with timing, so repeated runs differ by about 1 %.

--end-to-end turns delivery on: the relay (still one process, so callgrind sees all of it)
delivers to Postfix's smtp-sink through Knot, as bench/end_to_end.py does, and the count runs
until the sink has every message: accept, sign, spool, claim, deliver and settle.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
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
from bench.setups import VENV_BIN, AxiomRelay, smtp_source  # noqa: E402

OUT = ROOT / "bench" / "out" / "instructions.json"
# the end-to-end benchmark's receiver: its MX is named under comcast.net (bench/end_to_end.py)
E2E_RECEIVER = Receiver("comcast.net", "mx1.comcast.net", "127.0.90.1")
SENDER = "bench@bench.test"
console = Console()


def callgrind_relay(code: Path | None, out: Path, world: ReceivingWorld | None) -> AxiomRelay:
    # python -c, not the axiom script: callgrind follows the interpreter, not a wrapper.
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        str(VENV_BIN / "python"),
        "-c",
        "import sys; from axiom.cli import main; sys.argv = ['axiom', 'relay']; main()",
    ]
    if world is None:
        return AxiomRelay(1, command=command, code=code)
    return DeliveringRelay(1, world.env, command=command, code=code)


def dump(pid: int, label: str) -> None:
    result = subprocess.run(
        ["callgrind_control", f"--dump={label}", str(pid)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"callgrind_control failed: {result.stdout}{result.stderr}")


def instructions_in(out: Path, label: str) -> int:
    """The instruction total of the dump that callgrind_control --dump=label wrote."""
    for name in sorted(glob.glob(f"{out}*")):
        text = Path(name).read_text(errors="replace")
        if f"Trigger: dump {label}\n" in text:
            for line in text.splitlines():
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError(f"no callgrind dump labelled {label} in {out}*")


def measure(
    name: str, code: Path | None, messages: int, workdir: Path, world: ReceivingWorld | None
) -> dict:
    out = workdir / f"callgrind-{name}.out"
    relay = callgrind_relay(code, out, world)
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
        total = instructions_in(out, "load")
    finally:
        relay.stop()
        relay.remove()
    return {
        "name": name,
        "messages": messages,
        "spooled": spooled,
        "instructions": total,
        "instructions_per_message": total / messages,
        "seconds_under_callgrind": round(elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--against", help="a git revision to measure beside the working tree")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--end-to-end", action="store_true", help="delivery on, to smtp-sink; count until sunk"
    )
    args = parser.parse_args()
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
        if args.against:
            tree = workdir / "against"
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(ROOT),
                    "worktree",
                    "add",
                    "--detach",
                    "-f",
                    str(tree),
                    args.against,
                ],
                check=True,
                capture_output=True,
            )
            stack.callback(
                subprocess.run,
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
            )
            trees.insert(0, (args.against, tree))
        world = None
        if args.end_to_end:
            world = ReceivingWorld([E2E_RECEIVER])
            stack.callback(world.stop)
            world.start()
        for name, code in trees:
            results.append(measure(name, code, args.messages, workdir, world))

    what = "delivered" if args.end_to_end else "accepted"
    table = Table(title=f"user-space instructions per {what} message ({args.messages} × 2 KB)")
    table.add_column("code")
    table.add_column("M instructions / message", justify="right")
    table.add_column("× first", justify="right")
    for r in results:
        ratio = r["instructions_per_message"] / results[0]["instructions_per_message"]
        table.add_row(r["name"], f"{r['instructions_per_message'] / 1e6:.2f}", f"{ratio:.3f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
