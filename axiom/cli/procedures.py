"""`axiom procedures`: what every open procedure waits for, since when and until when; and
`axiom procedures sweep`, the scheduled sweep run once by hand."""

from __future__ import annotations

from datetime import datetime, timedelta

import typer
from rich.table import Table

from axiom.cli.app import (
    JsonFlag,
    LimitOption,
    app,
    engine,
    fail,
    out,
    print_json,
    say_if_cut,
    settings,
)
from protocol.procedures import open_procedures

procedures_app = typer.Typer(
    invoke_without_command=True,
    help="Open procedures: what each waits for, since, until (`sweep` runs the sweep now).",
)
app.add_typer(procedures_app, name="procedures")


@procedures_app.callback()
def procedures(ctx: typer.Context, json_output: JsonFlag = False, limit: LimitOption = 100) -> None:
    """Open procedures (running, or waiting with no process): what for, since, until.

    The same list is the Prefect artifact `waiting-procedures`, refreshed by the sweep.
    """
    if ctx.invoked_subcommand is not None:
        return
    page = open_procedures(engine(settings()), limit=limit)
    if json_output:
        print_json([w.as_json() for w in page.items])
        say_if_cut(page, "procedures", json_output)
        return
    table = Table("id", "procedure", "subject", "state", "waiting for", "since", "until", "run")
    for column in (table.columns[0], table.columns[1], table.columns[3]):
        column.no_wrap = True
    table.columns[7].overflow = "fold"  # a run id stays whole, to paste into the Prefect UI
    for w in page.items:
        table.add_row(
            str(w.id),
            w.name,
            w.subject,
            w.state,
            w.waiting_for or "",
            _when(w.since),
            _when(w.until),
            w.flow_run_id or "",
        )
    out.print(table if page.items else "no open procedures")
    say_if_cut(page, "procedures", json_output)


@procedures_app.command("sweep")
def sweep_now(json_output: JsonFlag = False) -> None:
    """Run the sweep once, now: expire overdue checkpoints, wake what is due, continue what
    lost its run. The deployment procedures-sweep/scheduled does the same every minute."""
    from flows.sweep import PrefectRuns
    from models.sandbox_clock import clock_for
    from notifications.desk import approval_desk
    from protocol.sweep import sweep
    from runbooks.loader import procedures_sweep

    s = settings()
    eng = engine(s)
    report = sweep(
        approval_desk(s, eng),
        eng,
        PrefectRuns(s.prefect_api()),
        now=clock_for(s.environment, eng).now,
        rewake_after=timedelta(seconds=procedures_sweep().spec.rewake_after_seconds),
    )
    if json_output:
        print_json(report.as_json())
    else:
        table = Table("what", "ids")
        for what, ids in report.as_json().items():
            table.add_row(what, ", ".join(map(str, ids)) or "-")
        out.print(table)
    if report.unreachable:  # what it could do without Prefect is done; the rest waits
        raise fail(f"Prefect unreachable at {s.prefect_api()}: the next sweep tries again", 1)


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment else ""
