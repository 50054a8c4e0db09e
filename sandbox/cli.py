"""`axiom sandbox …`: run the simulated receiving world, inspect it and steer it."""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

sandbox_app = typer.Typer(
    no_args_is_help=True, help="The simulated receiving world (sandbox mode only)."
)
out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ZoneOption = Annotated[str, typer.Option("--zone", help="The blocklist zone.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings():
    from config.settings import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _state():
    from sandbox.state import StateStore

    return StateStore.for_home(_settings().home)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _engine(settings):
    """The relay's database; refuses rather than create one (a SQLite connect would)."""
    from pathlib import Path

    from models.db import make_engine, normalise_url

    url = normalise_url(settings.db_url)
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1].split("?", 1)[0]).exists():
        raise _fail(f"no database at {url}: run `axiom init` (or `axiom up`) first", 2)
    return make_engine(url)


def _sandbox_only(settings, what: str) -> None:
    if settings.environment != "sandbox":
        raise _fail(f"AXIOM_ENVIRONMENT=production: {what}", 2)


def _sandbox_now(settings) -> float:
    """The sandbox clock's time (epoch seconds), what the world judges blocks by."""
    from sqlalchemy.exc import SQLAlchemyError

    from models.sandbox_clock import read_offset

    try:
        engine = _engine(settings)
    except typer.Exit:
        return time.time()
    try:
        return time.time() + read_offset(engine)
    except SQLAlchemyError:
        return time.time()
    finally:
        engine.dispose()


# ---------------------------------------------------------------- run
@sandbox_app.command("run")
def run() -> None:
    """Run the world in the foreground until SIGTERM or SIGINT; prints `sandbox ready`."""
    import asyncio
    import logging
    import signal

    from sandbox.behaviour import BehaviourError
    from sandbox.world import SandboxWorld

    settings = _settings()
    if settings.environment != "sandbox":
        raise _fail("AXIOM_ENVIRONMENT: the simulated world runs only in sandbox mode", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter

    async def main() -> None:
        world = SandboxWorld(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await world.start()
        try:
            info = world.describe()
            mx = ", ".join(f"{name} {v['address']}" for name, v in info["mx"].items())
            print(f"sandbox DNS {info['dns']}, MX port {info['mx_port']}: {mx}", flush=True)
            print("sandbox ready", flush=True)
            await stop.wait()
        finally:
            await world.stop()

    try:
        asyncio.run(main())
    except BehaviourError as exc:
        raise _fail(str(exc), 2) from None
    except OSError as exc:
        raise _fail(f"cannot listen: {exc}", 2) from None


# ---------------------------------------------------------------- listings
@sandbox_app.command("list")
def list_(json_output: JsonFlag = False) -> None:
    """Blocklist entries the sandbox DNS answers for."""
    rows = _state().listings()
    if json_output:
        _print_json([r.__dict__ for r in rows])
        return
    table = Table("zone", "listed", "code", "reason", "since")
    for r in rows:
        table.add_row(r.zone, r.subject, r.code, r.reason, _when(r.listed_at))
    out.print(table)
    out.print(f"{len(rows)} listing(s)")


def _zone(zone: str, kind: str):
    from sandbox.behaviour import behaviour

    try:
        found = behaviour().zone(zone)
    except KeyError:
        names = ", ".join(z.zone for z in behaviour().dnsbl if z.kind == kind and not z.part_of)
        raise _fail(f"--zone: unknown zone {zone!r}; one of {names}") from None
    if found.part_of:
        raise _fail(f"--zone: {zone} answers part of {found.part_of}; list in {found.part_of}")
    if found.kind != kind:
        raise _fail(f"--zone: {zone} lists {found.kind}s, not {kind}s")
    return found


@sandbox_app.command("list-ip")
def list_ip(
    ip: str,
    zone: ZoneOption = "zen.spamhaus.org",
    code: Annotated[
        str | None,
        typer.Option(
            "--code",
            help="Return code; default: the zone's listing code. An error code (127.255.255.254 "
            "for ZEN) is answered but is no listing: the scan's error path.",
        ),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (shown in status).")] = "cli",
) -> None:
    """List IP in a sandbox blocklist zone (e.g. Spamhaus ZEN); the world sees it at once."""
    try:
        address = str(ipaddress.ip_address(ip))
    except ValueError:
        raise _fail(f"{ip!r} is not an IPv4 or IPv6 address") from None
    found = _zone(zone, "ip")
    code = code or found.default_code
    if code not in found.codes and code not in found.errors:
        known = ", ".join([*found.codes, *found.errors])
        raise _fail(f"--code: {code!r} is not a {zone} listing or error code ({known})")
    _state().list(zone, address, code, reason)
    if code in found.errors:  # the zone answers it, but it is no listing (runbooks/blocklists)
        out.print(f"{address}: {zone} answers the error {code} ({found.errors[code]})")
        return
    out.print(f"{address} listed in {zone} ({code}: {found.codes[code]})", highlight=False)


@sandbox_app.command("unlist-ip")
def unlist_ip(ip: str, zone: ZoneOption = "zen.spamhaus.org") -> None:
    """Remove IP from a sandbox blocklist zone."""
    try:
        address = str(ipaddress.ip_address(ip))
    except ValueError:
        raise _fail(f"{ip!r} is not an IPv4 or IPv6 address") from None
    _zone(zone, "ip")
    if not _state().unlist(zone, address):
        raise _fail(f"{address} is not listed in {zone}")
    out.print(f"{address} removed from {zone}", highlight=False)


@sandbox_app.command("list-domain")
def list_domain(
    domain: str,
    zone: ZoneOption = "dbl.spamhaus.org",
    reason: Annotated[str, typer.Option("--reason", help="Why (shown in status).")] = "cli",
) -> None:
    """List DOMAIN in a sandbox domain blocklist (Spamhaus DBL)."""
    found = _zone(zone, "domain")
    assert found.default_code is not None
    _state().list(zone, domain.lower().rstrip("."), found.default_code, reason)
    out.print(f"{domain.lower()} listed in {zone} ({found.default_code})", highlight=False)


@sandbox_app.command("unlist-domain")
def unlist_domain(domain: str, zone: ZoneOption = "dbl.spamhaus.org") -> None:
    """Remove DOMAIN from a sandbox domain blocklist."""
    _zone(zone, "domain")
    if not _state().unlist(zone, domain.lower().rstrip(".")):
        raise _fail(f"{domain.lower()} is not listed in {zone}")
    out.print(f"{domain.lower()} removed from {zone}", highlight=False)


# ---------------------------------------------------------------- reputation
@sandbox_app.command("reputation")
def reputation(
    ip: str,
    provider: Annotated[
        str | None, typer.Option("--provider", help="One provider; default: all of them.")
    ] = None,
    score: Annotated[
        float | None, typer.Option("--score", help="Set this score (-100 cold … 100 established).")
    ] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Forget it: back to cold.")] = False,
) -> None:
    """Set or reset what the simulated providers think of a source IP (the world must run)."""
    from sandbox.behaviour import behaviour

    if (score is None) == (not reset):
        raise _fail("give exactly one of --score N or --reset")
    try:
        address = str(ipaddress.ip_address(ip))
    except ValueError:
        raise _fail(f"{ip!r} is not an IPv4 or IPv6 address") from None
    if provider is not None and provider not in {p.name for p in behaviour().providers}:
        raise _fail(f"--provider: unknown provider {provider!r}")
    state = _state()
    if not state.world():
        raise _fail("the sandbox world is not running: start `axiom up` or `axiom sandbox run`")
    if reset:
        command = state.request("reset-reputation", ip=address, provider=provider)
    else:
        command = state.request("set-reputation", ip=address, provider=provider, score=score)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = state.command_result(command)
        if result is not None:
            if result.startswith("error"):
                raise _fail(result)
            out.print(f"{address}: {result}", highlight=False)
            model, now = behaviour().reputation, _sandbox_now(_settings())
            for row in state.standings():
                if row.ip == address and provider in (None, row.provider):
                    s = _standing_view(row, model, now)
                    out.print(
                        f"  {s['provider']}: score {s['score']:.1f} ({s['tier']}), today"
                        f" {s['sent_today']} of {s['allowance']:.0f} allowed, clean days"
                        f" {s['clean_days']:.1f}",
                        highlight=False,
                        soft_wrap=True,
                    )
            return
        time.sleep(0.1)
    raise _fail("the sandbox world did not answer within 10 s; is it running?")


def _standing_view(row, model, now: float, key: str = "ip") -> dict:
    """A standing as status shows it: its tier, whether blocked, and today's volume against
    the day's allowance (counters of an earlier day, not yet closed by the world, are 0). A
    From domain's standing (key "domain") has its domain where an IP's has its address."""
    current = row.day == int(now // 86400)
    fields = {k: v for k, v in row.__dict__.items() if k != "ip"}
    return {
        "provider": row.provider,
        key: row.ip,
        **fields,
        "tier": model.tier_for(row.score).name,
        "blocked": row.blocked_until > now,
        "allowance": row.allowance or model.daily.allowance(row.clean_days),
        "sent_today": row.today.get("admitted", 0) if current else 0,
        "deferred_today": row.today.get("deferred", 0) + row.today.get("over", 0) if current else 0,
    }


# ---------------------------------------------------------------- status
@sandbox_app.command("status")
def status(json_output: JsonFlag = False) -> None:
    """Whether the world runs, where it listens, what it thinks of each IP, what it answered."""
    from sandbox.behaviour import behaviour
    from sandbox.mailbox import Mailboxes
    from sandbox.scenarios import _alive, mail_dir

    settings = _settings()
    state = _state()
    info = state.world()
    running = bool(info) and _alive(int(info.get("pid", 0)))
    model = behaviour().reputation
    now = _sandbox_now(settings)
    standings = [_standing_view(row, model, now) for row in state.standings()]
    domain_standings = [
        _standing_view(row, model, now, key="domain") for row in state.standings(domains=True)
    ]
    placement = _placement_totals(state.placement_daily())
    verdicts = state.verdict_counts()
    complaints = state.complaints()
    data = {
        "running": running,
        "world": info,
        "listings": [r.__dict__ for r in state.listings()],
        "overrides": [o.__dict__ for o in state.overrides()],
        "knobs": state.knobs(),
        "standings": standings,
        "domain_standings": domain_standings,
        "placement": placement,
        "answers": [{"provider": p, "outcome": o, "count": n} for (p, o), n in verdicts.items()],
        "mailboxes": Mailboxes(mail_dir(settings)).counts(),
        "complaints": {
            status: sum(1 for c in complaints if c["status"] == status)
            for status in sorted({c["status"] for c in complaints})
        },
        "last_complaint_reply": complaints[-1]["reply"] if complaints else None,
    }
    if json_output:
        _print_json(data)
        return
    if running:
        out.print(
            f"[green]running[/green] (pid {info['pid']}): DNS {info['dns']}, "
            f"MX port {info['mx_port']}",
            highlight=False,
        )
        table = Table("provider", "MX host", "address", "domains")
        for name, mx in info["mx"].items():
            table.add_row(name, mx["host"], mx["address"], ", ".join(mx["domains"]))
        out.print(table)
    else:
        out.print("[yellow]not running[/yellow] (start `axiom up` or `axiom sandbox run`)")
    if standings:
        table = Table(
            "ip",
            "provider",
            "score",
            "tier",
            "accepted",
            "deferred",
            "rejected",
            "complaints",
            title="What the providers think of the source IPs",
        )
        for s in standings:
            tier = "[red]blocked[/red]" if s["blocked"] else s["tier"]
            table.add_row(
                s["ip"],
                s["provider"],
                f"{s['score']:.1f}",
                tier,
                str(s["accepted"]),
                str(s["deferred"]),
                str(s["rejected"]),
                str(s["complaints"]),
            )
        out.print(table)
        table = Table(
            "ip",
            "provider",
            "sent today",
            "deferred today",
            "allowed a day",
            "clean days",
            title="Volume today against the allowance",
        )
        for s in standings:
            table.add_row(
                s["ip"],
                s["provider"],
                str(s["sent_today"]),
                str(s["deferred_today"]),
                f"{s['allowance']:.0f}",
                f"{s['clean_days']:.1f}",
            )
        out.print(table)
    if any(sum(by.values()) for by in placement.values()):
        out.print(_placement_table(placement, "Where the providers filed the mail they accepted"))
    if verdicts:
        table = Table("provider", "answer", "count", title="What the simulated MX servers answered")
        for (provider, outcome), n in sorted(verdicts.items()):
            table.add_row(provider, outcome, str(n))
        out.print(table)
    out.print(
        f"listings: {len(data['listings'])}   DNS overrides: {len(data['overrides'])}   "
        f"knobs: {json.dumps(data['knobs']) if data['knobs'] else 'none'}",
        highlight=False,
    )
    out.print(
        f"mail kept: {data['mailboxes'] or 'none'} under {mail_dir(settings)}", highlight=False
    )
    if complaints:
        out.print(
            f"complaint reports: {data['complaints']} (last reply: {data['last_complaint_reply']})",
            highlight=False,
        )


# ---------------------------------------------------------------- placement
def _placement_totals(rows: list[dict]) -> dict[str, dict[str, int]]:
    from sandbox.behaviour import behaviour

    totals = {p.name: {"inbox": 0, "spam": 0} for p in behaviour().providers}
    for row in rows:
        by = totals.setdefault(row["provider"], {"inbox": 0, "spam": 0})
        by["inbox"] += row["inbox"]
        by["spam"] += row["spam"]
    return totals


def _spam_share(inbox: int, spam: int) -> str:
    return f"{spam / (inbox + spam):.0%}" if inbox + spam else "-"


def _placement_table(totals: dict[str, dict[str, int]], title: str) -> Table:
    table = Table("provider", "inbox", "spam", "spam share", title=title)
    for provider, by in totals.items():
        table.add_row(
            provider, str(by["inbox"]), str(by["spam"]), _spam_share(by["inbox"], by["spam"])
        )
    return table


@sandbox_app.command("placement")
def placement(
    day: Annotated[str | None, typer.Option("--day", help="One day (YYYY-MM-DD).")] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="One source IP.")] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="One From domain (organisational).")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Where the simulated providers filed the mail they accepted, inbox or spam: per provider,
    and per day of the sandbox clock, source IP and From domain. The relay never sees this."""
    from sandbox.authn import organisational_domain

    wanted = organisational_domain(domain) if domain else None
    rows = [
        r
        for r in _state().placement_daily()
        if (day is None or r["day"] == day)
        and (ip is None or r["ip"] == ip)
        and (wanted is None or r["from_domain"] == wanted)
    ]
    totals = _placement_totals(rows)
    if json_output:
        _print_json({"providers": totals, "rows": rows})
        return
    out.print(_placement_table(totals, "Where the providers filed the mail they accepted"))
    if rows:
        table = Table(
            "day", "provider", "ip", "from domain", "inbox", "spam", "spam share", title="By day"
        )
        for r in rows:
            table.add_row(
                r["day"],
                r["provider"],
                r["ip"],
                r["from_domain"],
                str(r["inbox"]),
                str(r["spam"]),
                _spam_share(r["inbox"], r["spam"]),
            )
        out.print(table)
    out.print(
        "inbox: mail/<provider>/, spam: mail/<provider>/spam/ under the sandbox home; the "
        "relay got 250 for both"
    )


# ---------------------------------------------------------------- time and reset
clock_app = typer.Typer(
    help="The sandbox clock, shared by the relay, the world and the flows: show or advance it.",
    invoke_without_command=True,
)
sandbox_app.add_typer(clock_app, name="clock")


def _clock_view(settings, engine) -> dict:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy.exc import SQLAlchemyError

    from models.sandbox_clock import read_offset

    try:
        offset = read_offset(engine) if settings.environment == "sandbox" else 0.0
    except SQLAlchemyError:
        raise _fail(
            "the database has no sandbox_clock table: run `axiom init` to migrate"
        ) from None
    system = datetime.now(UTC)
    return {
        "now": (system + timedelta(seconds=offset)).isoformat(timespec="seconds"),
        "system_now": system.isoformat(timespec="seconds"),
        "offset_seconds": offset,
        "offset": _span(offset),
        "movable": settings.environment == "sandbox",
    }


def _span(seconds: float) -> str:
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "+" + ("".join(parts) or "0s")


def _print_clock(view: dict) -> None:
    out.print(
        f"sandbox time {view['now']} ({view['offset']} ahead of the system clock, "
        f"{view['system_now']})"
        if view["movable"]
        else f"system clock {view['system_now']} (production: it cannot be moved)",
        highlight=False,
    )


@clock_app.callback()
def clock(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Show the sandbox clock: its time and how far it runs ahead of the system clock."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings()
    engine = _engine(settings)
    try:
        view = _clock_view(settings, engine)
    finally:
        engine.dispose()
    _print_json(view) if json_output else _print_clock(view)


@clock_app.command("advance")
def clock_advance(
    duration: Annotated[
        str, typer.Argument(help="How far: 90s, 15m, 3h, 1d, 2w.", show_default=False)
    ],
    json_output: JsonFlag = False,
) -> None:
    """Move the sandbox's time forward: retries fall due, suspensions expire, warm-up days roll
    over, reputations decay. The relay, the world and the flows see it within a second."""
    from config.clock import parse_duration
    from models.sandbox_clock import read_offset, set_offset

    settings = _settings()
    _sandbox_only(settings, "the clock is the system clock and cannot be moved")
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if seconds <= 0:
        raise _fail(f"{duration!r}: time only moves forward (`axiom sandbox reset` returns it)")
    engine = _engine(settings)
    try:
        _clock_view(settings, engine)  # the table is there
        set_offset(engine, read_offset(engine) + seconds)
        view = _clock_view(settings, engine)
    finally:
        engine.dispose()
    if json_output:
        _print_json(view)
        return
    out.print(f"advanced {_span(seconds)}", highlight=False)
    _print_clock(view)


@sandbox_app.command("reset")
def reset(json_output: JsonFlag = False) -> None:
    """Back to clean, so scenarios run one after another: suspensions and throttles lifted
    (audited), held mail released, listings, DNS overrides and knobs removed, every
    reputation back to cold, and the clock back to the present."""
    from datetime import UTC, datetime

    from sqlalchemy.exc import SQLAlchemyError

    from sandbox.reset import reset_relay
    from sandbox.scenarios import _alive

    settings = _settings()
    _sandbox_only(settings, "`axiom sandbox reset` runs only in sandbox mode")
    state = _state()
    cleared = state.clear_steering()
    engine = _engine(settings)
    try:
        relay = reset_relay(engine, datetime.now(UTC))
    except SQLAlchemyError as exc:
        raise _fail(f"the relay's state was not reset: {str(exc).splitlines()[0]}") from None
    finally:
        engine.dispose()
    info = state.world()
    if info and _alive(int(info.get("pid", 0))):
        command = state.request("reset-world")
        deadline = time.monotonic() + 10
        while state.command_result(command) is None:
            if time.monotonic() > deadline:
                raise _fail("the sandbox world did not answer within 10 s; is it running?")
            time.sleep(0.1)
        world = state.command_result(command) or ""
    else:  # no world to ask: forget what the last one wrote
        state.delete_standings(None, None)
        state.delete_domain_standings()
        world = "standings cleared (the world is not running)"
    data = {
        "suspensions_lifted": relay.suspensions_lifted,
        "held_mail_released": relay.woken,
        "retries_moved_back": relay.retries_moved,
        "clock_offset_was_seconds": relay.offset_was,
        "listings_removed": cleared["listing"],
        "dns_overrides_removed": cleared["dns_override"],
        "knobs_removed": cleared["knob"],
        "world": world,
    }
    if json_output:
        _print_json(data)
        return
    out.print(
        f"sandbox reset: {len(relay.suspensions_lifted)} suspension(s) lifted, "
        f"{relay.woken} held recipient(s) released, {cleared['listing']} listing(s), "
        f"{cleared['dns_override']} DNS override(s) and {cleared['knob']} knob(s) removed; "
        f"world: {world}; clock back to the present (was {_span(relay.offset_was)})",
        highlight=False,
    )


# ---------------------------------------------------------------- scenarios
@sandbox_app.command("scenario")
def scenario(
    name: Annotated[
        str,
        typer.Argument(
            help="cold-ip-campaign, blocklisted-ip, complaint-spike, broken-dkim or "
            "dmarc-quarantine.",
            show_default=False,
        ),
    ],
    count: Annotated[int | None, typer.Option("--count", help="Messages to send (1-1000).")] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for delivery attempts (5-900).")
    ] = 90.0,
    submission: Annotated[
        str | None, typer.Option("--submission", help="HOST:PORT; default: up.json.")
    ] = None,
    username: Annotated[str | None, typer.Option("--username")] = None,
    password: Annotated[str | None, typer.Option("--password")] = None,
    domain: Annotated[str | None, typer.Option("--domain", help="The sending domain.")] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the scenario's listings and knobs in place.")
    ] = False,
    complaint_share: Annotated[
        float, typer.Option("--complaint-share", help="complaint-spike: share that complains.")
    ] = 0.05,
    json_output: JsonFlag = False,
) -> None:
    """Drive real traffic through the running relay into the world and summarise what happened."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sandbox.scenarios import SCENARIOS, Credentials, ScenarioError, ScenarioRunner

    settings = _settings()
    chosen = SCENARIOS.get(name)
    if chosen is None:
        raise _fail(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    try:
        credentials = Credentials.resolve(
            settings, submission=submission, username=username, password=password, domain=domain
        )
    except ScenarioError as exc:
        raise _fail(str(exc)) from None
    if not json_output:
        out.print(f"[bold]{chosen.name}[/bold]: {chosen.title}\n{chosen.explain}", highlight=False)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def report_progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], completed=done, total=total)

    try:
        runner = ScenarioRunner(settings, credentials, report_progress, complaint_share)
    except ScenarioError as exc:
        raise _fail(str(exc)) from None
    try:
        with progress:
            result = asyncio.run(runner.run(chosen, count or chosen.default_count, timeout, keep))
    except ScenarioError as exc:
        raise _fail(str(exc)) from None
    finally:
        runner.engine.dispose()
    if json_output:
        _print_json(result.as_dict())
        return
    _print_report(result)


def _print_report(report) -> None:
    for line in report.steering:
        out.print(f"  steering: {line}", highlight=False)
    if report.paths_already_suspended:
        out.print(
            "[yellow]paths already suspended before the run:[/yellow] "
            + "; ".join(report.paths_already_suspended),
            highlight=False,
        )
    table = Table(
        "provider",
        "sent",
        "delivered",
        "inbox",
        "spam",
        "deferred",
        "refused",
        "held",
        "not submitted",
        "complaints",
        "ARF sent",
        title=f"{report.scenario}: {report.count} messages in {report.seconds:.0f} s"
        + ("" if report.settled else " (timed out before every attempt was made)"),
    )
    for p in report.providers:
        table.add_row(
            p.provider,
            str(p.sent),
            str(p.delivered),
            str(p.inbox),
            str(p.spam),
            str(p.deferred),
            str(p.refused),
            str(p.held),
            str(p.refused_at_submission),
            str(p.complaints),
            str(p.arf_reports),
        )
    out.print(table)
    out.print(
        "delivered: answered 250; inbox, spam: where the provider filed it (the world's record,"
        " never told to the relay). refused: by the receiver (blocked or unknown mailbox). held:"
        " no attempt yet, the relay held it back (suspended or paced path). not submitted: the"
        " relay refused it at submission"
    )
    for p in report.providers:
        if p.top_reply:
            out.print(f"  {p.provider}, most common reply: {p.top_reply}", highlight=False)
    actions = Table(
        "ip",
        "provider",
        "action",
        "limit/min",
        "rule",
        "until",
        title="Protocol actions fired: suspensions",
    )
    for s in report.suspensions:
        actions.add_row(
            s["ip"],
            s["provider"],
            s["action"],
            str(s["limit_per_minute"] or ""),
            s["rule"] or "",
            s["until"][:19],
        )
    out.print(actions if report.suspensions else "Protocol actions fired: no suspension")
    if report.audit:
        audit = Table("id", "actor", "action", "subject", title="Audit entries written")
        for e in report.audit:
            audit.add_row(str(e["id"]), e["actor"], e["action"], e["subject"])
        out.print(audit)
    else:
        out.print("Audit entries written: none")
    if report.recommended:
        out.print(
            "Actions the classification recommends (for the Protocol's runbooks): "
            + ", ".join(f"{k} x{v}" for k, v in report.recommended.items()),
            highlight=False,
        )
    if report.complaint_reports:
        out.print(
            f"ARF complaint reports: {report.complaint_reports}; the feedback address answered: "
            f"{report.complaint_reply}",
            highlight=False,
        )


def _when(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))
