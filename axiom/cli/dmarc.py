"""`axiom dmarc reports`: what receivers' DMARC aggregate reports say, per published domain and
source IP over a period (protocol/dmarc_reports.py)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, app, clock_now, fail, out, print_json, reading
from protocol.dmarc_reports import SourceSummary, summary

dmarc_app = typer.Typer(no_args_is_help=True)
app.add_typer(dmarc_app, name="dmarc", help="DMARC aggregate reports received at the rua address.")

_PERIOD = re.compile(r"^(\d+)([hd])$")


def _period(text: str) -> timedelta:
    match = _PERIOD.match(text.strip())
    if not match or int(match[1]) == 0:
        raise fail(f"--since {text!r} must be a number of hours or days, e.g. 24h, 7d", 2)
    return timedelta(**{"hours" if match[2] == "h" else "days": int(match[1])})


@dmarc_app.command("reports")
def reports(
    domain: Annotated[
        str | None, typer.Option("--domain", help="Only this published domain.")
    ] = None,
    since: Annotated[
        str, typer.Option("--since", help="How far back report periods begin: 24h, 7d, 30d…")
    ] = "7d",
    json_output: JsonFlag = False,
) -> None:
    """Messages and DMARC failures per domain and source IP (ours marked), most mail first."""
    now = clock_now()
    start = now - _period(since)
    with reading() as session:
        rows = summary(session, domain=domain, since=start, until=now)
    if json_output:
        print_json([r.as_json() for r in rows])
        return
    out.print(_table(rows, since, domain))


def _table(rows: list[SourceSummary], since: str, domain: str | None) -> Table:
    where = f" for {domain}" if domain else ""
    table = Table(title=f"DMARC aggregate reports{where}, last {since}", title_justify="left")
    table.add_column("domain", overflow="fold")
    table.add_column("source IP", overflow="fold")
    table.add_column("ours")
    for name in ("messages", "fail", "fail %"):  # --json has the DKIM and SPF passes too
        table.add_column(name, justify="right")
    table.add_column("reported by", overflow="fold")
    for r in rows:
        failing = "bold red" if r.ours and r.dmarc_fail else None
        table.add_row(
            r.domain,
            r.source_ip,
            "yes" if r.ours else "",
            f"{r.messages:,}",
            f"{r.dmarc_fail:,}",
            f"{100 * r.fail_rate:.1f}",
            ", ".join(r.reporters),
            style=failing,
        )
    if not rows:
        table.caption = "no reports in this period"
    return table
