"""`axiom blocklist`: what the DNS blocklists say (runbooks/blocklists.yaml, protocol/blocklists.py).

`check IP_OR_DOMAIN` asks every list of its kind now, through AXIOM_DNS_NAMESERVERS, and
writes nothing: one row per list, listed / not listed / error, with the code, its meaning and
the list's TXT reason. Exit status: 0 clear everywhere, 1 listed somewhere, 2 only errors
besides clear answers (no verdict from some list: the resolver is refused, times out) or bad
input. `status` shows what the blocklist-scan runbook last recorded: the listings standing and
the lists whose last answer was an error.
"""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from axiom.cli.app import JsonFlag, app, engine, fail, out, print_json, settings
from models.db import session_scope
from protocol import blocklists
from protocol.errors import ServiceError
from runbooks.loader import blocklists as blocklists_runbook

blocklist_app = typer.Typer(
    no_args_is_help=True,
    help="DNS blocklists: check an IP or a domain now, or show the recorded listings.",
)
app.add_typer(blocklist_app, name="blocklist")


@blocklist_app.command("check")
def check(target: str, json_output: JsonFlag = False) -> None:
    """Ask every blocklist about IP_OR_DOMAIN now; exit 0 clear, 1 listed, 2 errors only."""
    config = settings()
    try:
        parsed = blocklists.parse_target(target)
    except ServiceError as exc:
        raise fail(str(exc), 2) from None
    answers = blocklists.check(parsed, config, lists=blocklists_runbook().spec.lists)
    if json_output:
        print_json({"target": parsed.name, "kind": parsed.kind, "lists": _json(answers)})
    else:
        out.print(_table(parsed, answers))
    listed = [a for a in answers if a.status == "listed"]
    errors = [a for a in answers if a.status == "error"]
    if not json_output:
        for line in _reasons(answers):
            out.print(Text(line), soft_wrap=True)
        out.print(_summary(parsed, listed, errors, len(answers)), highlight=False)
    if listed:
        raise typer.Exit(1)
    if errors:
        raise typer.Exit(2)


def _json(answers: list[blocklists.Answer]) -> list[dict]:
    rows = []
    for a in answers:
        row = a.as_json()
        row.pop("probe", None)
        rows.append(row)
    return rows


def _table(target: blocklists.Target, answers: list[blocklists.Answer]) -> Table:
    """One row per list and code (a ZEN listing often has several), the list's id to keep the
    meaning readable in 80 columns; the TXT reasons follow the table (_reasons)."""
    table = Table(title=f"{target.name} on the DNS blocklists", title_justify="left")
    table.add_column("list", no_wrap=True)
    table.add_column("answer", no_wrap=True)
    table.add_column("code", no_wrap=True)
    table.add_column("meaning", overflow="fold")
    for a in answers:
        if a.status == "listed":
            mark = Text("LISTED", style="bold red")
        elif a.status == "clear":
            mark = Text("not listed", style="green")
        else:
            mark = Text("error", style="yellow")
        if a.status == "error":
            table.add_row(a.list_id, mark, "\n".join(a.codes), Text(a.error))
            continue
        for n, (code, meaning) in enumerate(zip(a.codes, a.meanings, strict=True)):
            first = n == 0
            table.add_row(a.list_id if first else "", mark if first else "", code, Text(meaning))
        if not a.codes:
            table.add_row(a.list_id, mark, "", "")
    return table


def _reasons(answers: list[blocklists.Answer]) -> list[str]:
    return [
        f"{a.list_id} says: {reason}"
        for a in answers
        if a.status == "listed" and a.reason
        for reason in a.reason.split(" | ")
    ]


def _summary(target, listed, errors, total: int) -> str:
    parts = [f"{target.name}: listed on {len(listed)} of {total} lists"]
    if errors:
        parts.append(f"{len(errors)} error(s), not a verdict: see the resolver, ask again")
    return "; ".join(parts)


@blocklist_app.command("status")
def status(json_output: JsonFlag = False) -> None:
    """The listings the blocklist-scan runbook recorded, and lists whose last answer failed."""
    config = settings()
    lists = blocklists_runbook().spec
    with session_scope(engine(config)) as session:
        rows = blocklists.status(session)
        data = [
            {
                "target": r.target,
                "kind": r.target_kind,
                "list": r.list_id,
                "list_name": _name(lists, r.list_id),
                "state": r.state,
                "codes": list(r.codes),
                "meaning": r.meaning,
                "reason": r.reason,
                "first_seen": r.first_seen,
                "last_seen": r.last_seen,
                "cleared_at": r.cleared_at,
                "last_error": r.last_error,
                "last_error_at": r.last_error_at,
            }
            for r in rows
        ]
    if json_output:
        print_json(data)
        return
    if not data:
        out.print("no listing and no error recorded")
        return
    table = Table()
    for column in ("target", "list", "state", "since"):
        table.add_column(column, no_wrap=True)
    table.add_column("codes and meanings / last error", overflow="fold")
    for r in data:
        listed = r["state"] == "listed"
        since = r["first_seen"] if listed else r["last_error_at"]
        lines = _meanings(lists, r)
        if r["last_error"]:
            lines.append(f"last error: {r['last_error']}")
        table.add_row(
            r["target"],
            r["list"],
            Text(r["state"], style="bold red" if listed else ""),
            f"{since:%Y-%m-%d %H:%M}" if since else "",
            Text("\n".join(lines)),
        )
    out.print(table)


def _meanings(lists, row: dict) -> list[str]:
    """Each code's meaning as the runbook documents it (the row keeps them joined)."""
    if row["state"] != "listed":
        return []
    try:
        blocklist = lists.by_id(row["list"])
    except KeyError:  # a list since removed from the runbook
        return [row["meaning"]]
    return [f"{code} {blocklist.meaning(code)[1]}" for code in row["codes"]]


def _name(lists, list_id: str) -> str:
    try:
        return lists.by_id(list_id).name
    except KeyError:  # a list since removed from the runbook
        return list_id
