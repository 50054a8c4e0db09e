"""`axiom stats`: what happened to mail per provider, source IP, From domain or tenant stream
over a window; `axiom stats roll-up`: the events-retention runbook by hand."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, app, clock_now, engine, fail, out, print_json
from protocol.signals import SUBJECTS, WINDOWS, Stats, roll_up_and_expire, window_stats
from runbooks.loader import events_retention

stats_app = typer.Typer(invoke_without_command=True)
app.add_typer(stats_app, name="stats")

ByOption = Annotated[
    str,
    typer.Option("--by", help=f"Group by one of: {', '.join(SUBJECTS)}.", show_default=True),
]
WindowOption = Annotated[
    str,
    typer.Option("--window", help=f"How far back: {', '.join(WINDOWS)}.", show_default=True),
]


@stats_app.callback()
def stats(
    ctx: typer.Context,
    by: ByOption = "provider",
    window: WindowOption = "24h",
    json_output: JsonFlag = False,
) -> None:
    """Sent, delivered, deferred and refused by category, bounce and complaint rates, and the
    mail held back (by reason), per subject over the window, busiest first."""
    if ctx.invoked_subcommand is not None:
        return
    if by not in SUBJECTS:
        raise fail(f"--by {by!r}: one of {', '.join(SUBJECTS)}", 2)
    if window not in WINDOWS:
        raise fail(f"--window {window!r}: one of {', '.join(WINDOWS)}", 2)
    report = window_stats(engine(), by, window, clock_now())
    if json_output:
        print_json(report.as_json())
        return
    for table in _tables(report):
        out.print(table)


def _tables(report: Stats) -> list[Table]:
    """The counts and rates per subject; then, where there are any, the refusals by category
    and the held mail by reason (their own tables: they fit an 80-column terminal)."""
    table = Table(
        title=f"Last {report.window} by {report.by} "
        f"({report.start:%Y-%m-%d %H:%M} to {report.end:%Y-%m-%d %H:%M} UTC)",
        title_justify="left",
    )
    table.add_column(report.by, overflow="fold")
    for name in ("sent", "delivered", "deferred", "refused", "bounce %", "complaints", "compl. %"):
        table.add_column(name, justify="right")
    refused = Table(title="Refused by category", title_justify="left")
    held = Table(title="Held back (not sent now), by reason", title_justify="left")
    for extra in (refused, held):
        extra.add_column(report.by, overflow="fold")
        extra.add_column("category" if extra is refused else "reason")
        extra.add_column("recipients", justify="right")
    for s in report.subjects:
        table.add_row(
            s.subject,
            f"{s.sent:,}",
            f"{s.delivered:,}",
            f"{s.deferred:,}",
            f"{s.refused_total:,}",
            f"{s.bounce_rate:.2%}",
            f"{s.complaints:,}",
            f"{s.complaint_rate:.2%}",
        )
        for category, n in sorted(s.refused.items(), key=lambda i: (-i[1], i[0])):
            refused.add_row(s.subject, category, f"{n:,}")
        for reason, n in sorted(s.held.items(), key=lambda i: (-i[1], i[0])):
            held.add_row(s.subject, reason, f"{n:,}")
    if not report.subjects:
        table.caption = "no mail in this window"
    return [table] + [t for t in (refused, held) if t.row_count]


@stats_app.command("roll-up")
def roll_up(json_output: JsonFlag = False) -> None:
    """Roll completed hours up and expire old events now, as the hourly events-retention
    runbook does (runbooks/events-retention.yaml)."""
    rules = events_retention()
    done = roll_up_and_expire(
        engine(),
        rules.spec,
        clock_now(),
        actor="cli",
        runbook=(rules.id, rules.version),
    )
    if json_output:
        print_json(done.as_json())
        return
    data = done.as_json()
    out.print(
        f"{data['hours_rolled']} hour(s) rolled up ({data['rollup_rows']} row(s)), up to "
        f"{data['rolled_up_until']}; deleted {data['raw_deleted']:,} raw event(s), "
        f"{data['rollups_deleted']:,} roll-up row(s), {data['tallies_deleted']:,} tally row(s)",
        highlight=False,
    )
