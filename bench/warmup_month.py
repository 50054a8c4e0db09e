"""A month of IP warm-up in minutes (issue 15): the same campaign from a cold IP on the
`sandbox` plan and from a cold IP without one, side by side, one line a simulated day.

    .venv/bin/python -m bench.warmup_month [--days 30] [--per-provider 200] [--json PATH]

The world, the relay's delivery engine and the clock are testbed/warmup_month.py's (see there);
the same harness runs tests/integration/test_warmup_month.py. Prints a table per day: the
governed IP's stage and caps per provider (Gmail/Microsoft/Yahoo), what it delivered, what its
fallback IP delivered for it, and blocked/deferred/delivered for both IPs; then the totals and
the real time taken. Writes bench/out/warmup_month.json (every day, both runs, the daily run's
verdicts and follow-ups, the timings). Exit status 1 if the run broke the warm-up's promises
(a block or deferral of the governed IP, mail lost from the governed stream, no completion
proposed).
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
from testbed.warmup_month import (  # noqa: E402
    CAMPAIGN,
    GOVERNED,
    MonthReport,
    MonthSettings,
    WarmupMonth,
    fast_dir,
)


def table(report: MonthReport) -> Table:
    t = Table(title=f"Warm-up month from {report.started}: governed (plan sandbox) | ungoverned")
    for name in ("day", "stage g/m/y", "caps g/m/y", "gov blocked", "gov deferred"):
        t.add_column(name, justify="right")
    for name in ("gov delivered", "fallback delivered", "ungov blocked", "ungov deferred"):
        t.add_column(name, justify="right")
    t.add_column("ungov delivered", justify="right")
    t.add_column("judged")
    for d in report.days:
        g, o, u = d.governed, d.overflow, d.ungoverned
        t.add_row(
            str(d.day),
            "/".join(str(d.stages.get(p, "")) for p in CAMPAIGN.values()),
            "/".join(str(d.caps.get(p, "")) for p in CAMPAIGN.values()),
            str(g.blocked),
            str(g.deferred),
            str(g.delivered),
            str(o.delivered),
            f"[red]{u.blocked}[/red]" if u.blocked else "0",
            str(u.deferred),
            str(u.delivered),
            d.judged,
        )
    return t


def problems(report: MonthReport) -> list[str]:
    found = []
    gov = report.totals("governed")
    if gov.blocked or gov.deferred:
        found.append(f"governed IP blocked {gov.blocked}, deferred {gov.deferred}")
    tenant = GOVERNED[0]
    if report.outcome.get(tenant) != {"delivered": report.submitted.get(tenant)}:
        found.append(f"governed stream: {report.outcome.get(tenant)}")
    if report.completion_day() is None:
        found.append("no completion proposed")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-provider", type=int, default=MonthSettings.per_provider)
    parser.add_argument("--json", type=Path, default=OUT_DIR / "warmup_month.json")
    args = parser.parse_args()
    if not 1 <= args.days <= 90:
        parser.error("--days must be 1 to 90")
    settings = MonthSettings(days=args.days, per_provider=args.per_provider)
    say(f"warm-up month: {args.days} simulated days, {args.per_provider} a provider a day")
    with tempfile.TemporaryDirectory(prefix="warmup-month-", dir=fast_dir()) as tmp:
        report = asyncio.run(WarmupMonth(Path(tmp), settings).run())
    console.print(table(report))
    totals = {w: report.totals(w) for w in ("governed", "overflow", "ungoverned")}
    for name, t in totals.items():
        say(f"{name:>10}: delivered {t.delivered}, deferred {t.deferred}, blocked {t.blocked}")
    say(f"completion proposed on day {report.completion_day()}; outcome {report.outcome}")
    say(f"real time: {report.seconds}")
    found = problems(report)
    for p in found:
        say(f"[red]PROBLEM[/red] {p}")
    write_json(
        args.json,
        {"at": now_iso(), "machine": machine_info(), "problems": found, **report.as_json()},
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
