"""The fault matrix at full scale: every scenario of testbed/faults.py, one row each.

    .venv/bin/python -m bench.reliability [--short] [--only 3,5] [--json [PATH]]

`make reliability` runs it with FULL counts and writes the rows to bench/out/reliability.json;
tests/integration/test_fault_matrix.py runs the same scenarios with SHORT counts in `make test`.
The exit status is non-zero if any row fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from testbed.faults import FULL, SHORT, notes, run_matrix, table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the small counts `make test` uses")
    parser.add_argument("--only", default="", help="comma list of scenario numbers, e.g. 3,5")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="also write rows as JSON (- = stdout)"
    )
    parser.add_argument("--keep", action="store_true", help="keep each scenario's directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the fault matrix needs root (tmpfs mounts, Postfix's smtp-sink, PostgreSQL)")
        return 2
    console = Console(stderr=args.json == "-", width=None if sys.stdout.isatty() else 160)
    t0 = time.monotonic()
    rows = run_matrix(
        SHORT if args.short else FULL,
        [k.strip() for k in args.only.split(",") if k.strip()],
        say=lambda text: console.print(f"[dim]{time.monotonic() - t0:6.1f}s[/dim] {text}"),
        keep=args.keep,
    )
    console.print(table(rows))
    for line in notes(rows):
        console.print(line, highlight=False)
    if args.json:
        data = json.dumps([r.as_dict() for r in rows], indent=2, default=str)
        if args.json == "-":
            print(data)
        else:
            # bench/out/ is not in git (.gitignore): a fresh clone has no such directory
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data + "\n")
            console.print(f"rows written to {path}")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
