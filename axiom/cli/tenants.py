"""`axiom tenant …` and `axiom credential …`: customers and how they authenticate."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, admin, app, clock_now, err, out, print_json, reading
from protocol.tenants import (
    add_credential,
    add_network,
    add_tenant,
    list_tenants,
    pause_tenant,
    resume_tenant,
    set_tenant,
)
from protocol.verbs import by_operator

tenant_app = typer.Typer(no_args_is_help=True, help="Customers.")
credential_app = typer.Typer(
    no_args_is_help=True, help="SMTP credentials and bound client networks."
)
app.add_typer(tenant_app, name="tenant")
app.add_typer(credential_app, name="credential")


ContactOption = Annotated[
    str | None,
    typer.Option("--contact", help="Where customer notices go: one email address."),
]
LanguageOption = Annotated[
    str | None,
    typer.Option("--language", help="Language of customer-facing texts: it or en."),
]


@tenant_app.command("add")
def tenant_add(name: str, contact: ContactOption = None, language: LanguageOption = None) -> None:
    """Add a customer."""
    with admin() as session:
        tenant = add_tenant(session, name, language or "it", contact)
    out.print(
        f"tenant [bold]{name}[/bold] added; notices in {tenant.language}"
        + (f" to {tenant.contact_email}" if tenant.contact_email else ", none sent (no --contact)"),
        highlight=False,
        soft_wrap=True,
    )


@tenant_app.command("set")
def tenant_set(
    name: str,
    contact: ContactOption = None,
    clear_contact: Annotated[
        bool, typer.Option("--clear-contact", help="Remove the contact: no notices are sent.")
    ] = False,
    language: LanguageOption = None,
) -> None:
    """Change where NAME's notices go (--contact, --clear-contact) and their --language."""
    with admin() as session:
        tenant = set_tenant(
            session, name, contact=contact, clear_contact=clear_contact, language=language
        )
    out.print(
        f"tenant [bold]{name}[/bold]: notices in {tenant.language} "
        + (f"to {tenant.contact_email}" if tenant.contact_email else "not sent (no contact)"),
        highlight=False,
        soft_wrap=True,
    )


@tenant_app.command("list")
def tenant_list(json_output: JsonFlag = False) -> None:
    """Customers: language and contact of their notices, and whether they are paused."""
    with reading() as session:
        rows = [
            {
                "name": t.name,
                "language": t.language,
                "contact": t.contact_email,
                "paused": t.paused,
                "created_at": t.created_at,
            }
            for t in list_tenants(session)
        ]
    if json_output:
        print_json(rows)
        return
    table = Table("name", "language", "contact", "paused")
    table.columns[0].no_wrap = True
    table.columns[2].overflow = "fold"
    for r in rows:
        table.add_row(r["name"], r["language"], r["contact"] or "", "paused" if r["paused"] else "")
    out.print(table)


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
