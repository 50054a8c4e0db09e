"""`axiom runbooks validate` and `axiom classify`: the Protocol's data files, and using them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from axiom.cli.app import app, err, fail, out
from relay.delivery.classify import classify, parse_reply, provider_for_mx, rules, split_replies
from runbooks.loader import RUNBOOK_DIR, RunbookError, load_all

runbooks_app = typer.Typer(no_args_is_help=True, help="The Protocol's data files.")
app.add_typer(runbooks_app, name="runbooks")


@runbooks_app.command("validate")
def runbooks_validate(
    directory: Annotated[str | None, typer.Argument(help="Directory of runbook files.")] = None,
) -> None:
    """Load every runbook file; exit non-zero naming the first error's file, path and reason."""
    try:
        found = load_all(Path(directory) if directory else RUNBOOK_DIR)
    except RunbookError as exc:
        raise fail(str(exc)) from None
    table = Table("id", "kind", "version", "title")
    for rb in found.values():
        table.add_row(rb.id, rb.kind, rb.version, rb.title)
    out.print(table)
    out.print(f"{len(found)} runbook(s) valid")


@app.command("classify")
def classify_replies(
    replies: Annotated[
        list[str],
        typer.Argument(
            help='SMTP replies, e.g. "550 5.1.1 <x@y>: user unknown"; lines of a multi-line '
            'reply are separated by newlines (or a literal \\n). "-" reads stdin, one reply '
            "line per line; NNN- continuation lines join the reply they continue.",
            show_default=False,
        ),
    ],
    mx: Annotated[
        str | None,
        typer.Option("--mx", help="The MX host that answered; selects its provider's rules."),
    ] = None,
) -> None:
    """Classify SMTP replies: one JSON object per reply, in input order."""
    try:
        rules()
    except RunbookError as exc:
        raise fail(str(exc), 2) from None
    provider = provider_for_mx(mx) if mx else None
    inputs: list[tuple[str, str]] = []
    for position, value in enumerate(replies, 1):
        if value == "-":
            inputs += [(f"stdin line {n}", text) for n, text in split_replies(sys.stdin)]
        else:
            inputs.append((f"argument {position}", value.replace("\\n", "\n")))
    failed = False
    for label, text in inputs:
        try:
            reply = parse_reply(text)
        except ValueError as exc:
            failed = True
            err.print(
                f"[red]error:[/red] {label}: {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            continue
        result = classify(reply, provider).as_dict() | {"reply": text}
        sys.stdout.write(json.dumps(result) + "\n")
    if failed:
        raise typer.Exit(1)
