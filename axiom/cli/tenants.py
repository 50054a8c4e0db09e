"""`axiom tenant …` and `axiom credential …`: customers and how they authenticate."""

from __future__ import annotations

from typing import Annotated

import typer

from axiom.cli.app import admin, app, clock_now, err, out
from protocol.tenants import add_credential, add_network, add_tenant, pause_tenant, resume_tenant
from protocol.verbs import by_operator

tenant_app = typer.Typer(no_args_is_help=True, help="Customers.")
credential_app = typer.Typer(
    no_args_is_help=True, help="SMTP credentials and bound client networks."
)
app.add_typer(tenant_app, name="tenant")
app.add_typer(credential_app, name="credential")


@tenant_app.command("add")
def tenant_add(
    name: str,
    language: Annotated[
        str, typer.Option(help="Language of customer-facing texts: it or en.")
    ] = "it",
) -> None:
    """Add a customer."""
    with admin() as session:
        add_tenant(session, name, language)
    out.print(f"tenant [bold]{name}[/bold] added")


# Typed with --as, a pause or resume is the human decision itself (no checkpoint); allowed
# only to a registered operator holding a role of the tenant.pause checkpoint kind.
AsOption = Annotated[
    str, typer.Option("--as", help="Your operator name (`axiom operator add`); checked.")
]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; kept in the audit trail.")]


@tenant_app.command("pause")
def tenant_pause(name: str, operator: AsOption, reason: ReasonOption) -> None:
    """Pause NAME's sending: submissions get 451 4.7.1, queued mail waits; nothing is lost."""
    with admin() as session:
        act = by_operator(session, operator, "tenant.pause", f"tenant:{name}", reason, clock_now())
        pause_tenant(session, name, act)
    out.print(
        f"tenant [bold]{name}[/bold] paused: new submissions get 451 4.7.1 within a few "
        "seconds, queued mail waits; `axiom tenant resume` sends it",
        soft_wrap=True,
    )


@tenant_app.command("resume")
def tenant_resume(name: str, operator: AsOption, reason: ReasonOption) -> None:
    """Resume NAME's sending and send the mail that waited."""
    with admin() as session:
        act = by_operator(session, operator, "tenant.resume", f"tenant:{name}", reason, clock_now())
        _, woken = resume_tenant(session, name, act)
    out.print(
        f"tenant [bold]{name}[/bold] resumed; {woken} waiting recipient(s) woken", soft_wrap=True
    )


@credential_app.command("add")
def credential_add(tenant: str, username: str) -> None:
    """Create an SMTP credential; the password is printed once and stored only as a hash."""
    with admin() as session:
        password = add_credential(session, tenant, username)
    out.print(f"username: {username}\npassword: {password}", highlight=False)
    err.print("[yellow]The password is shown only once.[/yellow]")


@credential_app.command("add-network")
def credential_add_network(tenant: str, cidr: str) -> None:
    """Let connections from CIDR act as TENANT without AUTH (like Postfix's mynetworks)."""
    with admin() as session:
        bound = add_network(session, tenant, cidr)
    out.print(f"{bound.cidr} now submits as tenant [bold]{tenant}[/bold]")
