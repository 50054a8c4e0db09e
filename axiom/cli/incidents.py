"""`axiom incidents`: open incidents, one with its timeline, and moving one along."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import (
    JsonFlag,
    LimitOption,
    admin,
    app,
    clock_now,
    engine,
    err,
    out,
    print_json,
    reading,
    say_if_cut,
    settings,
)
from models.audit import as_utc
from protocol import incidents
from protocol.errors import ServiceError
from protocol.operators import operator_named

incidents_app = typer.Typer(
    invoke_without_command=True,
    help="Incidents: one cause on one subject, its state and timeline.",
)
app.add_typer(incidents_app, name="incidents")

Operator = Annotated[str, typer.Option("--as", help="Your operator name (`axiom operator list`).")]


@incidents_app.callback()
def incidents_list(
    ctx: typer.Context,
    json_output: JsonFlag = False,
    limit: LimitOption = 50,
    show_all: Annotated[bool, typer.Option("--all", help="Resolved ones too.")] = False,
) -> None:
    """Incidents not yet resolved (--all: every one), the most recently changed first."""
    if ctx.invoked_subcommand is not None:
        return
    with reading() as session:
        page = incidents.listing(session, include_resolved=show_all, limit=limit)
        rows = [_row(i) for i in page.items]
    if json_output:
        print_json(rows)
        say_if_cut(page, "incidents", json_output)
        return
    table = Table("id", "subject", "cause", "severity", "state", "signals", "updated")
    for column in table.columns[:2]:
        column.no_wrap = True
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["subject"],
            r["cause"],
            r["severity"],
            r["state"],
            str(r["occurrences"]),
            r["updated_at"][:16].replace("T", " "),
        )
    out.print(table if rows else ("no incidents" if show_all else "no open incidents"))
    say_if_cut(page, "incidents", json_output)


@incidents_app.command("show")
def incidents_show(incident_id: int, json_output: JsonFlag = False) -> None:
    """One incident and its whole timeline, each line with its audit entry."""
    with reading() as session:
        incident = incidents.get(session, incident_id)
        events = incidents.timeline(session, incident_id)
        document = _row(incident) | {
            "summary": incident.summary,
            "evidence": incident.evidence,
            "timeline": [
                {
                    "at": as_utc(e.at).isoformat(),
                    "kind": e.kind,
                    "actor": e.actor,
                    "summary": e.summary,
                    "audit_entry_id": e.audit_entry_id,
                    "approval_id": e.approval_id,
                }
                for e in events
            ],
        }
    if json_output:
        print_json(document)
        return
    out.print(
        f"[bold]incident #{incident_id}[/bold] {document['cause']} on {document['subject']}: "
        f"{document['state']}, {document['severity']}, {document['occurrences']} signal(s)",
        highlight=False,
    )
    if document["summary"]:
        out.print(document["summary"], highlight=False)
    table = Table("when (UTC)", "what", "who", "", "audit")
    table.columns[0].no_wrap = True
    for e in document["timeline"]:
        table.add_row(
            e["at"][:19].replace("T", " "),
            e["kind"],
            e["actor"],
            e["summary"],
            str(e["audit_entry_id"] or ""),
        )
    out.print(table)


@incidents_app.command("set")
def incidents_set(
    incident_id: int,
    state: Annotated[str, typer.Argument(help="mitigating, monitoring, resolved or escalated")],
    operator: Operator,
    note: Annotated[str, typer.Option("--note", help="Why; kept on the timeline.")] = "",
) -> None:
    """Move an incident along: open → mitigating → monitoring → resolved, or escalated."""
    with admin() as session:
        _operator(session, operator)
        incidents.transition(
            session, incident_id, state, actor=f"operator:{operator}", note=note, now=clock_now()
        )
    out.print(f"incident #{incident_id} is {state}")
    _publish(incident_id)


@incidents_app.command("note")
def incidents_note(incident_id: int, text: str, operator: Operator) -> None:
    """Add a note to an incident's timeline (audited)."""
    with admin() as session:
        _operator(session, operator)
        incidents.add_event(
            session,
            incident_id,
            "note",
            actor=f"operator:{operator}",
            summary=text,
            now=clock_now(),
        )
    out.print(f"note added to incident #{incident_id}")
    _publish(incident_id)


def _operator(session, name: str) -> None:
    if operator_named(session, name) is None:
        raise ServiceError(f"{name.strip() or '(no name)'} is not a registered operator")


def _publish(incident_id: int) -> None:
    """The change shows where people look: the incident's Slack message (edited in place, when
    Slack is set up) and its Prefect artifact (a new version; skipped, with a note, when
    Prefect cannot be reached — the next change or watch run brings it up to date)."""
    from notifications.announce import incident_report, publish_incident
    from notifications.slack import SlackNotifier

    s = settings()
    eng = engine(s)
    publish_incident(eng, SlackNotifier.from_settings(s), incident_id)
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_CLIENT_MAX_RETRIES,
            temporary_settings,
        )

        # One try: a person waits on this command, and the database already has the change.
        once = {PREFECT_API_URL: s.prefect_api(), PREFECT_CLIENT_MAX_RETRIES: 0}
        with temporary_settings(updates=once):
            create_markdown_artifact(
                key=f"incident-{incident_id}",
                markdown=incident_report(eng, incident_id, s.slack_language),
                description=f"Incident #{incident_id} and its timeline",
            )
    except Exception as exc:  # Prefect down or unreachable: the database has the change
        err.print(f"note: Prefect artifact incident-{incident_id} not updated ({exc})")


def _row(incident) -> dict:
    return {
        "id": incident.id,
        "subject": incident.subject,
        "cause": incident.cause,
        "severity": incident.severity,
        "state": incident.state,
        "occurrences": incident.occurrences,
        "opened_at": as_utc(incident.opened_at).isoformat(),
        "updated_at": as_utc(incident.updated_at).isoformat(),
        "resolved_at": as_utc(incident.resolved_at).isoformat() if incident.resolved_at else None,
    }
