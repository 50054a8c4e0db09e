"""Governed vs ungoverned (issue 17, "The measure of success"): each scenario's traffic twice
through the sandbox world, once under the Protocol and once through a plain relay, side by side.

    .venv/bin/python -m bench.experiment [NAME ...] [--scale full|small] [--json [PATH]]

The scenarios, the two runs and what is counted are testbed/experiment.py's (see there); the
same harness runs tests/integration/test_experiment.py at the small scale. Prints, per
scenario, refused, deferred, delivered to the inbox and to spam, still queued, time to the
first intervention and messages lost for both runs, the governed run's first actions, then a
summary line per scenario (refused at most half? higher inbox share?). Writes
bench/out/experiment-SCALE.json (or PATH). Exit status 1 if a run lost mail or a scenario
stopped at its time bound; a scenario where the Protocol does not win is reported, not failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402

from bench.common import OUT_DIR, console, machine_info, now_iso, say, write_json  # noqa: E402
from testbed.experiment import (  # noqa: E402
    SCALES,
    SCENARIOS,
    Experiment,
    ExperimentTimeout,
    ScenarioResult,
)
from testbed.sandbox_stack import fast_dir  # noqa: E402

TIME_LIMIT = {"small": 300.0, "full": 3600.0}  # real seconds at most per scenario


def table(result: ScenarioResult) -> Table:
    size = result.size
    t = Table(
        title=f"{result.name}: {result.title} ({result.scale}: {size.days} days, "
        f"{size.per_day} a day a tenant, from {result.started})"
    )
    t.add_column("measure")
    t.add_column("governed", justify="right")
    t.add_column("ungoverned", justify="right")
    for measure, governed, ungoverned in result.rows():
        t.add_row(measure, governed, ungoverned)
    return t


def summary(results: list[ScenarioResult]) -> Table:
    t = Table(title="Governed vs ungoverned")
    for name in ("scenario", "refused g/u", "≤ half", "inbox share g/u", "higher"):
        t.add_column(name, justify="right" if name != "scenario" else "left")
    for name in ("inbox of delivered g/u", "first intervention", "lost g/u"):
        t.add_column(name, justify="right")
    for r in results:
        g, u = r.governed, r.ungoverned

        def share(x):
            return "—" if x is None else f"{x:.1%}"

        t.add_row(
            r.name,
            f"{g.refused} / {u.refused}",
            "yes" if r.refused_at_most_half else "[red]no[/red]",
            f"{share(g.inbox_share)} / {share(u.inbox_share)}",
            "yes" if r.higher_inbox_share else "[red]no[/red]",
            f"{share(g.inbox_of_delivered)} / {share(u.inbox_of_delivered)}",
            "none" if g.first_intervention is None else f"{g.first_intervention:.0f} min",
            f"{g.lost} / {u.lost}",
        )
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(SCENARIOS))
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument(
        "--json", type=Path, nargs="?", const=None, default=None, help="where to write the JSON"
    )
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: one of {', '.join(SCENARIOS)}")
    names = args.names or list(SCENARIOS)
    path = args.json or OUT_DIR / f"experiment-{args.scale}.json"
    results: list[ScenarioResult] = []
    problems: list[str] = []
    for name in names:
        scenario = SCENARIOS[name]
        size = scenario.sizes[args.scale]
        say(f"{name}: {size.days} simulated days, {size.per_day} a day a tenant, both runs")
        with tempfile.TemporaryDirectory(prefix=f"experiment-{name}-", dir=fast_dir()) as tmp:
            experiment = Experiment(
                scenario, args.scale, Path(tmp), time_limit=TIME_LIMIT[args.scale], progress=say
            )
            try:
                result = asyncio.run(experiment.run())
            except ExperimentTimeout as exc:
                problems.append(str(exc))
                say(f"[red]{exc}[/red]")
                continue
        console.print(table(result))
        for line in result.governed.timeline[:8]:
            say(f"  governed: {line}")
        say(f"{name}: {result.steps} steps, {result.seconds} s")
        if result.governed.lost or result.ungoverned.lost:
            problems.append(f"{name}: lost {result.governed.lost} / {result.ungoverned.lost}")
        results.append(result)
    if results:
        console.print(summary(results))
    for p in problems:
        say(f"[red]PROBLEM[/red] {p}")
    write_json(
        path,
        {
            "at": now_iso(),
            "machine": machine_info(),
            "scale": args.scale,
            "problems": problems,
            "scenarios": [r.as_json() for r in results],
        },
    )
    say(f"wrote {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
