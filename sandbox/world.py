"""The simulated receiving world: sandbox DNS plus one simulated MX per provider, on loopback.

    world = SandboxWorld(settings)
    await world.start()        # listening; raises OSError if an address is taken
    assert await world.healthy()
    await world.stop()

The world reads the relay's database (source IPs and their PTR names, sending domains and
their DKIM keys) every few seconds to publish matching DNS, and the state file under
AXIOM_HOME/sandbox/ (listings, overrides, knobs, requests) whenever it changes; it writes back
the IPs' and From domains' standings, every answer its MX servers gave, where accepted mail was
filed (inbox or spam, sandbox/placement.py) and the complaint reports it sent.
Nothing here is imported by the relay: the relay reaches this world through its settings
only (`relay_environment`). Nor does the world import the relay or the control plane: it
builds the records it publishes from the database rows (sandbox/published.py) and verifies
DKIM with dkimpy as published, never through the relay's patches (relay/patches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiosmtplib

from config.clock import OffsetClock
from config.settings import Settings, split_host_port
from config.tls import server_context, write_self_signed
from models.sandbox_clock import read_offset
from sandbox.behaviour import Behaviour, behaviour
from sandbox.dns import DnsServer
from sandbox.feedback import FeedbackSender
from sandbox.lookup import SandboxLookup
from sandbox.mailbox import Mailboxes
from sandbox.mx import ProviderHandler, ReceiverContext, start_receiver
from sandbox.reputation import Reputation
from sandbox.state import StateStore
from sandbox.zones import CustomerRecords, Zone, mx_addresses, world_records

log = logging.getLogger("axiom.sandbox")
SANDBOX_DELIVERY_PORT = (
    2526  # when AXIOM_DELIVERY_PORT is not set (its default, 25, is production's)
)
STATE_POLL_SECONDS = 0.25
DATABASE_POLL_SECONDS = 2.0
HEALTH_TIMEOUT = 3.0


def mx_port(settings: Settings) -> int:
    """The one port every simulated MX listens on, the relay's AXIOM_DELIVERY_PORT."""
    if "delivery_port" in settings.model_fields_set:
        return settings.delivery_port
    return SANDBOX_DELIVERY_PORT


def relay_environment(settings: Settings) -> dict[str, str]:
    """What `axiom up` gives the relay so it delivers into this world: settings only."""
    return {
        "AXIOM_DELIVERY_PORT": str(mx_port(settings)),
        "AXIOM_DNS_NAMESERVERS": settings.sandbox_dns_listen,
    }


async def _listening(start, what: str):
    """Await a server start; a bind failure names the address and the settings behind it."""
    try:
        return await start
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: {exc.strerror or exc}") from None


def sandbox_home(settings: Settings) -> Path:
    return settings.home / "sandbox"


class SandboxWorld:
    def __init__(
        self,
        settings: Settings,
        *,
        source_ips: Mapping[str, str | None] | None = None,
        model: Behaviour | None = None,
    ):
        self.settings = settings
        self.behaviour = model or behaviour()
        self.home = sandbox_home(settings)
        self.state = StateStore.for_home(settings.home)
        self.mailboxes = Mailboxes(self.home / "mail")
        self.dns_host, self.dns_port = split_host_port(settings.sandbox_dns_listen)
        self.port = mx_port(settings)
        self.addresses = mx_addresses(self.behaviour, settings.sandbox_mx_network)
        # The sandbox clock, shared with the relay and the flows through the database: an
        # advance expires blocks, ages the spam-rate window and lets reputations decay here.
        self.clock = OffsetClock(self._read_clock_offset)
        self.reputation = Reputation(self.behaviour.reputation, self.clock.timestamp)
        # The From domains' standings: the IPs' arithmetic with the domains' own losses, and
        # a spam rate read over a day's mail of all the domain's IPs (placement's minimum).
        ip_rate = self.behaviour.reputation.spam_rate
        domain_rate = ip_rate.model_copy(
            update={
                "min_volume": self.behaviour.placement.complaints.domain_min_inbox
                or ip_rate.min_volume
            }
        )
        domain_model = self.behaviour.reputation.model_copy(
            update={"losses": self.behaviour.placement.domain_losses, "spam_rate": domain_rate}
        )
        self.domains = Reputation(domain_model, self.clock.timestamp)
        self._given_ips = dict(source_ips or {})
        self._customers = CustomerRecords(settings.hostname, self._given_ips)
        self._zone = Zone(self.behaviour, ())
        self._knobs: dict[str, Any] = {}
        self._listings: list = []
        self._overrides: list = []
        self._generation = -1
        self._dns: DnsServer | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task] = []
        self._feedback: FeedbackSender | None = None
        self.context: ReceiverContext | None = None
        self._announced = False
        self._engine = None
        self._engine_lock = threading.Lock()

    # ------------------------------------------------------------ interface for `axiom up`
    async def start(self) -> None:
        await asyncio.to_thread(self.home.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(self.clock.refresh)
        await asyncio.to_thread(self._load_state)
        self.reputation.restore(await asyncio.to_thread(self.state.standings))
        self.domains.restore(await asyncio.to_thread(lambda: self.state.standings(domains=True)))
        await self._refresh_database()
        self._rebuild_zone()
        self._dns = DnsServer(self.dns_host, self.dns_port, lambda: self._zone)
        try:
            await _listening(
                self._dns.start(),
                f"DNS {self.dns_host}:{self.dns_port} (AXIOM_SANDBOX_DNS_LISTEN)",
            )
            self.dns_port = self._dns.port
            lookup = SandboxLookup(self.dns_host, self.dns_port, zone=lambda: self._zone)
            feedback_to = self.settings.sandbox_feedback_address or self.settings.feedback_mailbox
            target = split_host_port(
                self.settings.sandbox_feedback_smtp
                or self.settings.inbound_listen
                or self.settings.submission_listen
            )
            self._feedback = FeedbackSender(self.state, self.home / "feedback", target, feedback_to)
            self.context = ReceiverContext(
                behaviour=self.behaviour,
                reputation=self.reputation,
                lookup=lookup,
                mailboxes=self.mailboxes,
                addresses=self.addresses,
                feedback=self._feedback,
                knobs=lambda: self._knobs,
                now=self.clock.now,
                domains=self.domains,
            )
            tls = await asyncio.to_thread(self._tls_context)
            for provider in self.behaviour.providers:
                handler = ProviderHandler(provider, self.context)
                address = self.addresses[provider.name]
                server = await _listening(
                    start_receiver(handler, address, self.port, tls),
                    f"{provider.name} MX {address}:{self.port} "
                    "(AXIOM_SANDBOX_MX_NETWORK, AXIOM_DELIVERY_PORT)",
                )
                self._servers.append(server)
        except BaseException:
            await self.stop()
            raise
        self._tasks = [
            asyncio.create_task(self.clock.follow()),
            asyncio.create_task(self._watch_state()),
            asyncio.create_task(self._watch_database()),
        ]
        await asyncio.to_thread(self.state.announce, self.describe())
        self._announced = True
        log.info(
            "sandbox world ready: DNS %s:%s, MX port %s", self.dns_host, self.dns_port, self.port
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await server.wait_closed()
        self._servers = []
        if self._feedback is not None:
            await self._feedback.stop()
        if self._dns is not None:
            await self._dns.stop()
            self._dns = None
        with contextlib.suppress(Exception):
            await self.flush()
            if self._announced:  # never another world's announcement on the same home
                await asyncio.to_thread(self.state.withdraw)
                self._announced = False
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    async def healthy(self) -> bool:
        """The DNS answers gmail.com's MX and every simulated MX greets with 220."""
        if self._dns is None or self.context is None:
            return False
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                found = await self.context.lookup.query("gmail.com", "MX")
                if not found.ok:
                    return False
                for address in self.addresses.values():
                    client = aiosmtplib.SMTP(
                        hostname=address, port=self.port, timeout=2, start_tls=False
                    )
                    await client.connect()
                    await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return True

    # ------------------------------------------------------------ for tests and status
    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": time.time(),
            "dns": f"{self.dns_host}:{self.dns_port}",
            "mx_port": self.port,
            "mx": {
                p.name: {
                    "address": self.addresses[p.name],
                    "host": p.mx[0][1],
                    "domains": p.domains,
                }
                for p in self.behaviour.providers
            },
            "mail_dir": str(self.mailboxes.root),
        }

    @property
    def dns_address(self) -> tuple[str, int]:
        return self.dns_host, self.dns_port

    def mx_address(self, provider: str) -> tuple[str, int]:
        return self.addresses[provider], self.port

    async def refresh(self) -> None:
        """Re-read the database and the state file now rather than at the next poll."""
        await self._refresh_database()
        await asyncio.to_thread(self._load_state)
        await self._run_commands()
        self._rebuild_zone()

    # ------------------------------------------------------------ polling
    async def _watch_state(self) -> None:
        while True:
            await asyncio.sleep(STATE_POLL_SECONDS)
            try:
                generation = await asyncio.to_thread(self.state.generation)
                if generation != self._generation:
                    await asyncio.to_thread(self._load_state)
                    await self._run_commands()
                    self._rebuild_zone()
                await self.flush()
            except Exception:
                log.exception("sandbox state poll failed")

    async def _watch_database(self) -> None:
        while True:
            await asyncio.sleep(DATABASE_POLL_SECONDS)
            try:
                if await self._refresh_database():
                    self._rebuild_zone()
            except Exception:
                log.exception("sandbox database poll failed")

    def _load_state(self) -> None:
        self._generation = self.state.generation()
        self._listings = self.state.listings()
        self._overrides = self.state.overrides()
        self._knobs = self.state.knobs()

    def _rebuild_zone(self) -> None:
        records = world_records(self.behaviour, self.addresses, self._customers)
        self._zone = Zone(self.behaviour, records, self._overrides, self._listings)

    async def _refresh_database(self) -> bool:
        customers = await asyncio.to_thread(self._read_database)
        if customers is None or customers == self._customers:
            return False
        self._customers = customers
        return True

    def _database_engine(self):
        """The read-only engine on the relay's database; None while it does not exist (a
        SQLite connection would create the file)."""
        from sandbox.database import reader

        url = self.settings.db_url
        if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).exists():
            return None
        with self._engine_lock:  # the clock's reads and the database poll run in threads
            if self._engine is None:
                self._engine = reader(url)
            return self._engine

    def _read_clock_offset(self) -> float:
        engine = self._database_engine()
        return 0.0 if engine is None else read_offset(engine)

    def _read_database(self) -> CustomerRecords | None:
        """Source IPs and sending domains from the relay's database (None: not there yet)."""
        from sqlalchemy.exc import SQLAlchemyError
        from sqlmodel import Session, select

        from models import IpAddress
        from sandbox.published import published_records

        engine = self._database_engine()
        if engine is None:
            return None
        try:
            with Session(engine) as session:
                ips = {ip.address: ip.ptr_name for ip in session.exec(select(IpAddress)).all()}
                domains = published_records(session, self.settings.hostname)
        except SQLAlchemyError as exc:
            log.debug("database not readable yet: %s", exc)
            return None
        return CustomerRecords(self.settings.hostname, ips | self._given_ips, domains)

    async def flush(self) -> None:
        """Write standings and answers to the state file now (the poll does it 4 times a second)."""
        if self.context is None:
            return
        verdicts = self.context.take_verdicts()
        placements = self.context.take_placements()
        self.reputation.age()
        self.domains.age()
        rows = self.reputation.take_dirty()
        domain_rows = self.domains.take_dirty()
        if verdicts:
            await asyncio.to_thread(self.state.add_verdicts, verdicts)
        if placements:
            await asyncio.to_thread(self.state.add_placements, placements)
        if rows:
            await asyncio.to_thread(self.state.save_standings, rows)
        if domain_rows:
            await asyncio.to_thread(lambda: self.state.save_standings(domain_rows, domains=True))

    async def _run_commands(self) -> None:
        for command in await asyncio.to_thread(self.state.pending_commands):
            try:
                result = self._apply(command.name, command.args)
            except (KeyError, ValueError) as exc:
                result = f"error: {exc}"
            if command.name in ("reset-reputation", "reset-world"):
                await asyncio.to_thread(
                    self.state.delete_standings,
                    command.args.get("provider"),
                    command.args.get("ip"),
                )
            if command.name == "reset-world":
                await asyncio.to_thread(self.state.delete_domain_standings)
            await self.flush()
            await asyncio.to_thread(self.state.finish_command, command.id, result)

    def _apply(self, name: str, args: dict[str, Any]) -> str:
        providers = (
            [args["provider"]]
            if args.get("provider")
            else [p.name for p in self.behaviour.providers]
        )
        for provider in providers:
            self.behaviour.provider(provider)  # KeyError for a provider we do not simulate
        if name == "reset-world":  # `axiom sandbox reset`: every standing, today's volumes
            if self.context is not None:
                self.context.volume.clear()
            self.domains.reset(None, None)
            return f"reset {self.reputation.reset(None, None)} standings"
        if name == "reset-reputation":
            return f"reset {self.reputation.reset(args.get('provider'), args.get('ip'))} standings"
        if name == "set-reputation":
            changed = self.reputation.set_score(providers, args["ip"], float(args["score"]))
            return f"set {len(changed)} standings to {float(args['score'])}"
        raise ValueError(f"unknown command {name!r}")

    def _tls_context(self):
        cert, key = self.home / "tls" / "cert.pem", self.home / "tls" / "key.pem"
        if not cert.exists() or not key.exists():
            write_self_signed(cert, key, "mx.sandbox.test")
        return server_context(cert, key)
