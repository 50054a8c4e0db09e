"""`axiom pool|ip|stream …` and `axiom suspensions`: where mail leaves from, and what is held."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from axiom.cli.app import JsonFlag, admin, app, clock_now, fail, out, print_json, reading
from protocol.egress import (
    add_ip,
    add_pool,
    move_stream,
    reinstate_ip,
    release_stream,
    retire_ip,
    set_stream,
)
from protocol.suspensions import (
    active_suspensions,
    get_suspension,
    lift_suspension,
    shorten_suspension,
    throttle_path,
)
from protocol.verbs import by_operator

pool_app = typer.Typer(no_args_is_help=True, help="IP pools (dedicated or shared).")
ip_app = typer.Typer(no_args_is_help=True, help="Source IP addresses.")
stream_app = typer.Typer(no_args_is_help=True, help="Tenant streams and their pools.")
app.add_typer(pool_app, name="pool")
app.add_typer(ip_app, name="ip")
suspension_app = typer.Typer(
    no_args_is_help=True, help="Lift or shorten a protective suspension (`axiom suspensions`)."
)
app.add_typer(stream_app, name="stream")
app.add_typer(suspension_app, name="suspension")

# The operator verbs: typing one with --as is the human decision itself (no checkpoint), so
# it is allowed only to a registered operator holding a role of the verb's checkpoint kind.
AsOption = Annotated[
    str, typer.Option("--as", help="Your operator name (`axiom operator add`); checked.")
]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why; kept in the audit trail.")]


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


@stream_app.command("release")
def stream_release(
    tenant: str,
    stream: str,
    operator: AsOption,
    reason: ReasonOption,
    pool: Annotated[
        str | None,
        typer.Option("--pool", help="Bind to this pool instead of the one the hold left."),
    ] = None,
) -> None:
    """Release a held stream (pool hold) to the pool it left, and send its waiting mail."""
    now = clock_now()
    with admin() as session:
        act = by_operator(
            session, operator, "stream.release", f"stream:{tenant}/{stream}", reason, now
        )
        _, bound, fallback, woken = release_stream(session, tenant, stream, act, pool)
    extra = f", overflow to [bold]{fallback}[/bold]" if fallback else ""
    out.print(
        f"{tenant}/{stream} released: sends from pool [bold]{bound}[/bold]{extra}; "
        f"{woken} waiting recipient(s) woken",
        soft_wrap=True,
    )


@stream_app.command("move")
def stream_move(
    tenant: str,
    stream: str,
    operator: AsOption,
    reason: ReasonOption,
    pool: Annotated[
        str | None,
        typer.Option("--pool", help="Move to this pool instead of the stream's overflow pool."),
    ] = None,
) -> None:
    """Move a stream to its overflow pool (or --pool), without overflow."""
    now = clock_now()
    with admin() as session:
        act = by_operator(
            session, operator, "stream.move", f"stream:{tenant}/{stream}", reason, now
        )
        done = move_stream(session, tenant, stream, act, pool)
    out.print(
        f"{tenant}/{stream} moved from pool {done['pool']} to [bold]{done['to_pool']}[/bold]; "
        f"back with: {done['back_with']}",
        soft_wrap=True,
    )


@ip_app.command("retire")
def ip_retire(address: str, operator: AsOption, reason: ReasonOption) -> None:
    """Stop sending from ADDRESS (state retired); `axiom ip reinstate` undoes it."""
    now = clock_now()
    with admin() as session:
        act = by_operator(session, operator, "ip.retire", f"ip:{address}", reason, now)
        ip = retire_ip(session, address, act)
    out.print(f"{ip.address} retired", soft_wrap=True)


@ip_app.command("reinstate")
def ip_reinstate(address: str, operator: AsOption, reason: ReasonOption) -> None:
    """Return a retired ADDRESS to the state it had before its retirement."""
    now = clock_now()
    with admin() as session:
        act = by_operator(session, operator, "ip.reinstate", f"ip:{address}", reason, now)
        ip, woken = reinstate_ip(session, address, act)
    out.print(
        f"{ip.address} reinstated as [bold]{ip.state}[/bold]; {woken} recipient(s) woken",
        soft_wrap=True,
    )


@suspension_app.command("lift")
def suspension_lift(suspension_id: int, operator: AsOption, reason: ReasonOption) -> None:
    """End suspension ID now and send the mail it held."""
    now = clock_now()
    with admin() as session:
        subject = _path(session, suspension_id)
        act = by_operator(session, operator, "suspension.lift", subject, reason, now)
        row, woken = lift_suspension(session, suspension_id, act)
    out.print(
        f"suspension {row.id} of {row.source_ip} for {row.provider} lifted; "
        f"{woken} waiting recipient(s) woken",
        soft_wrap=True,
    )


@suspension_app.command("throttle")
def suspension_throttle(
    ip: str,
    provider: str,
    operator: AsOption,
    reason: ReasonOption,
    per_minute: Annotated[
        int, typer.Option("--per-minute", help="At most this many messages a minute.")
    ],
    for_: Annotated[str, typer.Option("--for", help="How long: 90s, 30m, 2h, 1d.")] = "1h",
) -> None:
    """Slow the path IP → PROVIDER to --per-minute for a while (it ends by itself)."""
    now = clock_now()
    until = now + _duration(for_, "--for")
    with admin() as session:
        act = by_operator(session, operator, "path.throttle", f"path:{ip}/{provider}", reason, now)
        row = throttle_path(session, ip, provider, per_minute, until, act)
    out.print(
        f"throttle {row.id}: {ip} → {provider} at most {per_minute}/min until "
        f"{until:%Y-%m-%d %H:%M:%S}Z",
        soft_wrap=True,
    )


@suspension_app.command("shorten")
def suspension_shorten(
    suspension_id: int,
    operator: AsOption,
    reason: ReasonOption,
    until: Annotated[
        str | None, typer.Option("--until", help="New expiry, ISO 8601 (UTC unless it says).")
    ] = None,
    by: Annotated[
        str | None, typer.Option("--by", help="Shorten by this much: 90s, 30m, 2h, 1d.")
    ] = None,
) -> None:
    """Bring suspension ID's expiry forward (--until TIME or --by DURATION)."""
    if (until is None) == (by is None):
        raise fail("say either --until TIME or --by DURATION")
    now = clock_now()
    with admin() as session:
        subject = _path(session, suspension_id)
        act = by_operator(session, operator, "suspension.shorten", subject, reason, now)
        if until is not None:
            new_until = _moment(until)
        else:
            new_until = _aware(get_suspension(session, suspension_id).expires_at) - _duration(by)
        row, woken = shorten_suspension(session, suspension_id, new_until, act)
    out.print(
        f"suspension {row.id} of {row.source_ip} for {row.provider} now ends "
        f"{new_until:%Y-%m-%d %H:%M:%S}Z; {woken} waiting recipient(s) fall due then",
        soft_wrap=True,
    )


def _path(session, suspension_id: int) -> str:
    row = get_suspension(session, suspension_id)
    return f"path:{row.source_ip}/{row.provider}"


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _duration(text: str, option: str = "--by") -> timedelta:
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) == 0:
        raise fail(f"{option} {text!r} must be a number and a unit, e.g. 90s, 30m, 2h, 1d")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise fail(f"--until {text!r} is not an ISO 8601 time, e.g. 2026-11-26T15:30") from None
    return _aware(moment)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@app.command()
def suspensions(json_output: JsonFlag = False) -> None:
    """Active protective suspensions and throttles of (IP, provider) paths."""
    with reading() as session:
        rows = active_suspensions(session, clock_now())
    if json_output:
        print_json([r.model_dump() for r in rows])
        return
    table = Table("id", "ip", "provider", "action", "limit/min", "until", "rule", "reason")
    table.columns[1].no_wrap = True
    table.columns[7].overflow = "fold"
    for r in rows:
        table.add_row(
            str(r.id),
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
