"""`axiom domain …`: sending domains, the DNS records to publish, activation by hand."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from axiom.cli.app import JsonFlag, admin, app, fail, out, print_json, settings
from config.settings import ConfigError
from relay.submission.keystore import KeyBox

domain_app = typer.Typer(no_args_is_help=True, help="Sending domains and their DNS records.")
app.add_typer(domain_app, name="domain")


@domain_app.command("add")
def domain_add(tenant: str, domain: str) -> None:
    """Add a sending domain (pending) with RSA-2048 and Ed25519 DKIM keys; print its records."""
    # DKIM and key libraries (~90 ms) load for the domain commands only
    from protocol.domains import add_domain

    try:
        keybox = KeyBox(settings().load_secret_key())
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    with admin() as session:
        add_domain(session, keybox, tenant, domain)
    out.print(f"domain [bold]{domain.lower()}[/bold] added (pending). Publish these records:")
    domain_records_command(domain, json_output=False)


@domain_app.command("records")
def domain_records_command(domain: str, json_output: JsonFlag = False) -> None:
    """The DNS records the customer must publish for DOMAIN (runbooks/dns-records.yaml)."""
    # DKIM and key libraries (~90 ms) load for the domain commands only
    from protocol.domains import domain_records

    config = settings()
    with admin() as session:
        records = domain_records(session, domain, config.hostname, config.dmarc_mailbox)
    if json_output:
        print_json([r.as_json() for r in records])
        return
    # Zone-file lines rather than a table: the values are long and must be copied whole.
    for r in records:
        sys.stdout.write(f"; {r.purpose}\n{r.zone_line()}\n")


@domain_app.command("activate")
def domain_activate(
    domain: str,
    operator: Annotated[
        str,
        typer.Option(
            "--as",
            help="A registered operator whose role may answer domain.activate "
            "(runbooks/checkpoints.yaml).",
        ),
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why it is activated by hand.")],
) -> None:
    """Activate DOMAIN by hand (audited). The onboarding runbook is the normal path."""
    # DKIM and key libraries (~90 ms) load for the domain commands only
    from protocol.domains import activate_domain

    with admin() as session:
        activate_domain(session, domain, operator, reason)
    out.print(f"domain [bold]{domain.lower()}[/bold] is active; its DKIM keys now sign")


@domain_app.command("return-path")
def domain_return_path(
    domain: str,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The subdomain (default bounces.DOMAIN, or the one set)."),
    ] = None,
    published: Annotated[
        bool | None,
        typer.Option(
            "--published/--not-published",
            help="Its MX (the relay's inbound listener) and SPF (the relay's IPs) are in DNS: "
            "mail from DOMAIN then leaves with it as return path (SPF aligned for DMARC).",
        ),
    ] = None,
) -> None:
    """Name DOMAIN's return-path subdomain and mark it published (audited)."""
    from protocol.return_paths import set_return_path

    with admin() as session:
        found = set_return_path(session, domain, name=name, published=published)
        rp, live = found.return_path_domain, found.return_path_published_at is not None
    state = "published: used in MAIL FROM" if live else "not published: the relay's own is used"
    out.print(f"domain [bold]{domain.lower()}[/bold]: return path {rp} ({state})")


@domain_app.command("show")
def domain_show(domain: str, json_output: JsonFlag = False) -> None:
    """DOMAIN as the domain runbooks see it: state, keys, return path, DNS, open procedures."""
    from rich.table import Table

    from protocol.domains import describe

    with admin() as session:
        shown = describe(session, domain)
    if json_output:
        print_json(shown)
        return
    dns = shown["dns"]
    verdict = {True: "passes", False: "FAILS", None: "never checked"}[dns["passed"]]
    out.print(
        f"[bold]{shown['domain']}[/bold] ({shown['tenant']}): {shown['state']}; return path "
        f"{shown['return_path']} ({'in use' if shown['return_path_published'] else 'not in use'});"
        f" DNS {verdict}"
        + (f" at {dns['checked_at'][:16]}" if dns["checked_at"] else "")
        + (f": {', '.join(dns['failing'])}" if dns["failing"] else "")
    )
    keys = Table(title="DKIM keys", title_justify="left")
    for column in ("selector", "algorithm", "state", "signing since", "retired at"):
        keys.add_column(column)
    for k in shown["keys"]:
        keys.add_row(
            k["selector"],
            k["algorithm"],
            k["state"],
            (k["activated_at"] or "")[:16],
            (k["retire_at"] or "")[:16],
        )
    out.print(keys)
    if shown["procedures"]:
        for p in shown["procedures"]:
            out.print(f"procedure #{p['id']} {p['name']}: {p['state']} ({p['waiting_for'] or ''})")
    if shown["streams"]:
        streams = Table(title=f"Streams of {shown['tenant']} (declared)", title_justify="left")
        for column in ("stream", "pool", "kind", "per day", "per month", "days/week", "list"):
            streams.add_column(column)
        for s in shown["streams"]:
            streams.add_row(
                s["stream"],
                s["pool"] or "",
                s["kind"] or "",
                f"{s['per_day']:,}" if s["per_day"] is not None else "",
                f"{s['per_month']:,}" if s["per_month"] is not None else "",
                str(s["days_per_week"] or ""),
                f"{s['list_source']} ({s['list_age_months']} mo)" if s["list_source"] else "",
            )
        out.print(streams)
