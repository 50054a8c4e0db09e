"""`axiom audit` and `axiom complaints`: the hash-chained trail and the complaint reports in it."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, LimitOption, app, out, print_json, reading, say_if_cut
from protocol.audit import recent_entries, verify_trail
from protocol.complaints import complaint_reports


@app.command()
def audit(
    json_output: JsonFlag = False,
    verify: Annotated[bool, typer.Option("--verify", help="Recompute the hash chain.")] = False,
    limit: LimitOption = 50,
) -> None:
    """List the audit trail (newest entries, oldest of them first), or verify its hash chain."""
    with reading() as session:
        if verify:
            count = verify_trail(session)
            if json_output:
                print_json({"ok": True, "entries": count})
            else:
                out.print(f"audit chain intact: {count} entries verified")
            return
        page = recent_entries(session, limit)
    if json_output:
        print_json([e.model_dump() for e in page.items])
        say_if_cut(page, "entries", json_output)
        return
    with_runbook = any(e.runbook_id for e in page.items)
    table = Table(title=f"audit ({page.total} entries)")
    id_width = max((len(str(e.id)) for e in page.items), default=2)
    table.add_column("id", no_wrap=True, justify="right", min_width=id_width)
    table.add_column("at", no_wrap=True, min_width=19)
    table.add_column("actor", overflow="fold")
    table.add_column("action", overflow="fold")
    table.add_column("subject", overflow="fold")
    if with_runbook:
        table.add_column("runbook", overflow="fold")
    table.add_column("evidence", overflow="fold")
    # A summary; `--json` has the whole of it. Narrow terminals get less of it, not less id.
    evidence_chars = 80 if out.width >= 140 else 32
    for e in page.items:
        cells = [str(e.id), e.at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.action, e.subject]
        if with_runbook:
            cells.append(f"{e.runbook_id}@{e.runbook_version}" if e.runbook_id else "")
        cells.append(_summary(json.dumps(e.evidence, default=str), evidence_chars))
        table.add_row(*cells)
    out.print(table)
    say_if_cut(page, "entries", json_output)


@app.command()
def complaints(json_output: JsonFlag = False, limit: LimitOption = 50) -> None:
    """Complaint reports (ARF) the inbound listener recorded, newest last."""
    with reading() as session:
        page = complaint_reports(session, limit)
    if json_output:
        print_json([asdict(report) for report in page.items])
        say_if_cut(page, "complaint reports", json_output)
        return
    table = Table("at", "provider", "type", "recipient", "queue id", "suppressed", "user agent")
    table.columns[3].overflow = "fold"
    table.columns[4].no_wrap = True
    table.columns[4].min_width = 26
    table.columns[6].overflow = "fold"
    for r in page.items:
        table.add_row(
            f"{r.at:%Y-%m-%d %H:%M:%S}",
            r.provider or "",
            r.feedback_type or "",
            ", ".join(r.recipients),
            r.queue_id or "(no message of ours)",
            "yes" if r.suppressed else "no",
            (r.user_agent or "")[:40],
        )
    out.print(table)
    out.print(f"{len(page.items)} shown")
    say_if_cut(page, "complaint reports", json_output)


def _summary(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"
