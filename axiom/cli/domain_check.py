"""`axiom domain check DOMAIN [--json]`: what DOMAIN has published in DNS, row by row, checked
as the onboarding, rotation and health runbooks check it (protocol/dns_checks.py).

Exit status: 0 the domain passes, 1 it does not, 2 bad input (no such domain, bad settings).
The table is stored in Domain.dns_checks like the runbooks' own checks, with no audit entry:
it is an observation of DNS, and it changes nothing the relay or a decision reads (the
runbooks audit what they do, with their own check as evidence).
"""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from axiom.cli.app import JsonFlag, clock_now, engine, fail, out, print_json, settings
from axiom.cli.domains import domain_app
from models.db import session_scope
from protocol.errors import ServiceError


@domain_app.command("check")
def domain_check(domain: str, json_output: JsonFlag = False) -> None:
    """Check DOMAIN's DNS (SPF, DKIM, DMARC, alignment, return path, our IPs' reverse DNS)
    against what it must publish; exit 0 when it passes, 1 when it does not."""
    from protocol.dns_checks import check_and_record

    config = settings()
    now = clock_now()
    try:
        with session_scope(engine(config)) as session:
            result = check_and_record(session, domain, config, now=now)
            session.commit()
    except ServiceError as exc:  # the domain does not exist
        raise fail(str(exc), 2) from None
    if json_output:
        print_json(result.as_json())
    else:
        out.print(_table(result))
        verdict = "passes" if result.passed else "does not pass"
        out.print(
            f"{result.domain} {verdict}: {len(result.missing())} of {len(result.checks)} not ok"
        )
    if not result.passed:
        raise typer.Exit(1)


def _table(result) -> Table:
    table = Table(
        title=f"DNS of {result.domain} at {result.checked_at:%Y-%m-%d %H:%M} UTC",
        title_justify="left",
    )
    table.add_column("check", no_wrap=True)
    table.add_column("ok", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for row in result.checks:
        if row.ok:
            mark = Text("ok", style="green")
        elif row.level == "warn":
            mark = Text("warn", style="yellow")
        else:
            mark = Text("FAIL", style="bold red")
        table.add_row(row.name, mark, Text(row.reason))
    return table
