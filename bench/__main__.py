"""`make bench`: every benchmark part in turn, each in its own process, then a summary.

    .venv/bin/python -m bench [--only submission,end_to_end,memory,soak] [--soak-minutes 10]

  submission  accepted msg/s: Axiom vs Postfix vs Postfix + OpenDKIM (bench/submission.py)
  end_to_end  msg/s from submission until smtp-sink has them: Axiom vs Postfix (issue 3)
  memory      relay RSS with 100,000 messages queued, SQLite and PostgreSQL (issue 5)
  soak        SOAK_MINUTES at half Axiom's end-to-end peak from this run (issue 5)

Each part writes bench/out/<part>.json; this runner adds bench/out/bench.json with the
headline figures. A part that fails does not stop the others; the exit status says whether
all passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import OUT_DIR, console, now_iso, say, write_json  # noqa: E402

PARTS = ("submission", "end_to_end", "memory", "soak")


def command(part: str, args: argparse.Namespace, started: float) -> list[str]:
    if part == "submission":
        return [sys.executable, str(ROOT / "bench" / "submission.py")]
    cmd = [sys.executable, "-m", f"bench.{part}"]
    if part == "soak":
        cmd += ["--soak-minutes", str(args.soak_minutes)]
        peak = end_to_end_peak(started)
        if peak:
            cmd += ["--peak-rate", f"{peak[0]:.2f}", "--peak-source", peak[1]]
    return cmd


def load(part: str, started: float | None = None) -> dict | None:
    """A part's JSON, if it exists and (with started) was written by this run."""
    path = OUT_DIR / f"{part}.json"
    try:
        if started is not None and path.stat().st_mtime < started:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def end_to_end_peak(started: float) -> tuple[float, str] | None:
    data = load("end_to_end", started)
    if not data:
        return None
    rates = {k: v["rate"] for k, v in data["setups"].items() if k.startswith("axiom") and v["rate"]}
    if not rates:
        return None
    key = max(rates, key=rates.get)
    return rates[key], f"Axiom's end-to-end peak in this run ({key})"


def summary(started: float, outcomes: dict[str, int]) -> dict:
    figures: dict[str, object] = {"parts": outcomes}
    if sub := load("submission", started):
        figures["submission_msg_per_s"] = {k: v["rate"] for k, v in sub["setups"].items()}
        figures["submission_load"] = [
            sub["machine"]["background_load_before"],
            sub["machine"]["background_load_after"],
        ]
    if e2e := load("end_to_end", started):
        figures["end_to_end_msg_per_s"] = {k: v["rate"] for k, v in e2e["setups"].items()}
        figures["end_to_end_ratios"] = e2e["ratios"]
        figures["end_to_end_other_load"] = {
            k: [r["other_load"] for r in v["runs"]] for k, v in e2e["setups"].items()
        }
    if mem := load("memory", started):
        figures["memory_peak_rss_mb"] = {b["backend"]: b["rss_mb"]["peak"] for b in mem["backends"]}
    if soak := load("soak", started):
        figures["soak"] = {
            "rate": soak["parameters"]["rate"],
            "p50_ms": soak["summary"]["p50_ms"],
            "p99_ms": soak["summary"]["p99_ms"],
            "rss": soak["rss"],
            "all_delivered": soak["all_delivered"],
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help="comma list of parts")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")

    started = time.time()
    os.environ.setdefault("BENCH_STARTED_AT", str(started))  # one clock for every part
    outcomes: dict[str, int] = {}
    for number, part in enumerate(parts, 1):
        say(f"[bold]== bench part {number}/{len(parts)}: {part} ==[/bold]")
        t0 = time.monotonic()
        outcomes[part] = subprocess.run(command(part, args, started), cwd=ROOT).returncode
        say(
            f"[bold]== {part}: {'ok' if outcomes[part] == 0 else 'FAILED'} "
            f"in {time.monotonic() - t0:.0f}s ==[/bold]"
        )
    figures = summary(started, outcomes)
    write_json(OUT_DIR / "bench.json", {"generated_at": now_iso(), **figures})
    console.print_json(json.dumps(figures, default=str))
    return 0 if all(code == 0 for code in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
