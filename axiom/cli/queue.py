"""`axiom queue` and `axiom queue show`: the spool per recipient, one message as it will be sent."""

from __future__ import annotations

import sys

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, LimitOption, app, out, print_json, reading, say_if_cut
from protocol.queue import SpooledRecipient, spooled_message, spooled_recipients

queue_app = typer.Typer(invoke_without_command=True, help="The spool.")
app.add_typer(queue_app, name="queue")

# Below this width the table drops the sender and the size and shortens times, so that the
# 26-character queue id always fits whole and can be pasted into `axiom queue show`.
WIDE = 140


@queue_app.callback()
def queue(ctx: typer.Context, json_output: JsonFlag = False, limit: LimitOption = 100) -> None:
    """List spooled recipients with their state (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    with reading() as session:
        page = spooled_recipients(session, limit)
    if json_output:
        print_json([_as_json(r) for r in page.items])
    else:
        out.print(_table(page.items, wide=out.width >= WIDE))
    say_if_cut(page, "recipients", json_output)


def _as_json(r: SpooledRecipient) -> dict:
    return {
        "queue_id": r.queue_id,
        "from": r.mail_from,
        "to": r.address,
        "size": r.size,
        "state": r.state,
        "attempts": r.attempts,
        "next_attempt_at": r.next_attempt_at,
        "last_reply": r.last_reply,
        "created_at": r.created_at,
    }


def _table(rows: list[SpooledRecipient], *, wide: bool) -> Table:
    table = Table()
    table.add_column("queue id", no_wrap=True, min_width=26)
    if wide:
        table.add_column("from", overflow="fold")
    table.add_column("to", overflow="fold")
    if wide:
        table.add_column("size", justify="right")
    table.add_column("state")
    table.add_column("attempts" if wide else "tries", justify="right")
    table.add_column("next attempt")
    table.add_column("last reply", overflow="fold")
    when = "%Y-%m-%d %H:%M:%S" if wide else "%m-%d %H:%M"
    for r in rows:
        cells = [r.queue_id]
        if wide:
            cells.append(r.mail_from)
        cells.append(r.address)
        if wide:
            cells.append(str(r.size))
        cells += [
            r.state,
            str(r.attempts),
            f"{r.next_attempt_at:{when}}" if r.next_attempt_at else "",
            r.last_reply or "",
        ]
        table.add_row(*cells)
    return table


@queue_app.command("show")
def queue_show(
    queue_id: str = typer.Argument(help="A queue id, or a unique prefix of one (6+ characters)."),
    json_output: JsonFlag = False,
) -> None:
    """Show one spooled message exactly as it will be sent (like postcat)."""
    with reading() as session:
        spooled = spooled_message(session, queue_id)
    message, recipients = spooled.message, spooled.recipients
    if json_output:
        print_json(
            {
                "queue_id": message.id,
                "mail_from": message.mail_from,
                "recipients": [{"address": r.address, "state": str(r.state)} for r in recipients],
                "stream": message.stream,
                "size": message.size,
                "data": message.data.decode("utf-8", "replace"),
            }
        )
        return
    sys.stdout.write(f"*** ENVELOPE RECORDS {message.id} ***\n")
    sys.stdout.write(f"message_size: {message.size}\ncreate_time: {message.created_at}\n")
    sys.stdout.write(f"sender: {message.mail_from}\nstream: {message.stream}\n")
    for r in recipients:
        sys.stdout.write(f"recipient: {r.address} ({r.state})\n")
    sys.stdout.write("*** MESSAGE CONTENTS ***\n")
    sys.stdout.write(message.data.decode("utf-8", "replace").replace("\r\n", "\n"))
    sys.stdout.write("*** END OF MESSAGE ***\n")
