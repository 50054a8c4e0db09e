"""`axiom operator …`, `axiom approvals`, `axiom approve`: who answers checkpoints, and answering."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import (
    JsonFlag,
    admin,
    app,
    engine,
    err,
    fail,
    out,
    print_json,
    reading,
    settings,
)
from protocol.approvals import Answer, ApprovalDesk, Refusal
from protocol.operators import add_operator, list_operators

operator_app = typer.Typer(no_args_is_help=True, help="Operators who answer checkpoints.")
app.add_typer(operator_app, name="operator")


@operator_app.command("add")
def operator_add(
    name: str,
    role: Annotated[
        list[str], typer.Option("--role", help="A role from runbooks/checkpoints.yaml; repeat.")
    ],
    slack_id: Annotated[
        str | None, typer.Option("--slack-id", help="Their Slack user id (U…).")
    ] = None,
) -> None:
    """Register an operator; they may answer the checkpoints their roles allow, nothing else."""
    with admin() as session:
        add_operator(session, name, role, slack_id)
    out.print(f"operator [bold]{name}[/bold] added with roles {', '.join(sorted(set(role)))}")


@operator_app.command("list")
def operator_list(json_output: JsonFlag = False) -> None:
    """Registered operators, their roles and Slack ids."""
    with reading() as session:
        rows = list_operators(session)
    if json_output:
        print_json([r.model_dump() for r in rows])
        return
    table = Table("name", "roles", "slack id")
    table.columns[0].no_wrap = True
    table.columns[2].no_wrap = True
    for r in rows:
        table.add_row(r.name, r.roles, r.slack_user_id or "")
    out.print(table)


@app.command()
def approvals(json_output: JsonFlag = False) -> None:
    """Pending checkpoint approvals, soonest to expire first."""
    from notifications.slack import approval_channels  # slack_sdk: ~80 ms, for this only

    s = settings()
    rows = ApprovalDesk(engine(s)).pending()  # reads only: no Slack, no Prefect
    if json_output:
        print_json([r.model_dump() for r in rows])
        return
    table = Table("id", "kind", "subject", "proposal", "may answer", "expires", "run")
    table.columns[0].no_wrap = True
    table.columns[3].overflow = "fold"
    table.columns[6].overflow = "fold"
    for r in rows:
        table.add_row(
            str(r.id),
            r.kind,
            r.subject,
            json.dumps(r.proposal, default=str)[:60],
            r.allowed_roles,
            f"{r.expires_at:%Y-%m-%d %H:%M:%S}",
            r.flow_run_id or "",
        )
    out.print(table)
    out.print(f"{len(rows)} pending; {approval_channels(s)}", highlight=False)


@app.command()
def approve(
    approval_id: int,
    operator: Annotated[str, typer.Option("--as", help="Your operator name.")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve.")] = False,
    comment: Annotated[str, typer.Option("--comment", help="Kept in the audit trail.")] = "",
) -> None:
    """Answer a checkpoint: same checks as Slack and the Prefect UI; the first answer wins."""
    s = settings()
    from notifications.desk import approval_desk  # Slack and Prefect wired in

    desk = approval_desk(s, engine(s))
    answer = Answer(
        approval_id=approval_id,
        verdict="reject" if reject else "approve",
        via="cli",
        operator=operator,
        comment=comment,
    )
    try:
        decided = desk.decide(answer)
    except Refusal as refusal:
        raise fail(f"refused ({refusal.reason}): {refusal.message}", 3) from None
    verb = "rejected" if reject else "approved"
    out.print(f"approval #{approval_id} {verb} by {decided.operator}", highlight=False)
    if decided.resumed is not None and not decided.resumed.accepted:
        err.print(
            f"[yellow]the run was not resumed ({decided.resumed.status} "
            f"{decided.resumed.reason}); it acts on this decision when it next reads it, "
            "at the latest at expiry[/yellow]",
            highlight=False,
        )
