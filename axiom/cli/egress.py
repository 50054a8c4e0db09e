"""`axiom pool|ip|stream …` and `axiom suspensions`: where mail leaves from, and what is held."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, admin, app, out, print_json, reading
from config.clock import SystemClock
from protocol.egress import add_ip, add_pool, set_stream
from protocol.suspensions import active_suspensions

pool_app = typer.Typer(no_args_is_help=True, help="IP pools (dedicated or shared).")
ip_app = typer.Typer(no_args_is_help=True, help="Source IP addresses.")
stream_app = typer.Typer(no_args_is_help=True, help="Tenant streams and their pools.")
app.add_typer(pool_app, name="pool")
app.add_typer(ip_app, name="ip")
app.add_typer(stream_app, name="stream")


@pool_app.command("add")
def pool_add(
    name: str,
    kind: Annotated[str, typer.Option("--kind", help="dedicated or shared.")] = "shared",
) -> None:
    """Add an IP pool."""
    with admin() as session:
        add_pool(session, name, kind)
    out.print(f"pool [bold]{name}[/bold] ({kind}) added")


@ip_app.command("add")
def ip_add(
    address: str,
    pool: Annotated[str, typer.Option("--pool", help="The pool it sends for.")],
    ptr: Annotated[str | None, typer.Option("--ptr", help="Its PTR name, said in EHLO.")] = None,
    weight: Annotated[int, typer.Option("--weight", help="Share of the pool's traffic.")] = 100,
) -> None:
    """Add a source IP to a pool (state cold until warmed up)."""
    with admin() as session:
        ip = add_ip(session, address, pool, ptr, weight)
    out.print(f"{ip.address} added to pool [bold]{pool}[/bold] (weight {weight}, cold)")


@stream_app.command("set")
def stream_set(
    tenant: str,
    stream: str,
    pool: Annotated[str, typer.Option("--pool", help="The pool this stream sends from.")],
    fallback: Annotated[str | None, typer.Option("--fallback", help="Overflow pool.")] = None,
) -> None:
    """Bind TENANT's STREAM to a pool (and optionally an overflow pool)."""
    with admin() as session:
        set_stream(session, tenant, stream, pool, fallback)
    extra = f", overflow to [bold]{fallback}[/bold]" if fallback else ""
    out.print(f"{tenant}/{stream} sends from pool [bold]{pool}[/bold]{extra}")


@app.command()
def suspensions(json_output: JsonFlag = False) -> None:
    """Active protective suspensions and throttles of (IP, provider) paths."""
    with reading() as session:
        rows = active_suspensions(session, SystemClock().now())
    if json_output:
        print_json([r.model_dump() for r in rows])
        return
    table = Table("ip", "provider", "action", "limit/min", "until", "rule", "reason")
    table.columns[0].no_wrap = True
    table.columns[6].overflow = "fold"
    for r in rows:
        table.add_row(
            r.source_ip,
            r.provider,
            r.action,
            str(r.limit_per_minute or ""),
            f"{r.expires_at:%Y-%m-%d %H:%M:%S}",
            r.rule_id or "",
            r.reason[:60],
        )
    out.print(table)
    out.print(f"{len(rows)} active")
