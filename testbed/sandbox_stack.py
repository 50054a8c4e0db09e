"""One relay and the sandbox world it delivers into, in this process, on a clock this code moves.

    stack = SandboxStack(tmp / "governed", reactions=True)
    await stack.start(seed, at=day0)          # migrate, seed, world, delivery engine, inbound
    await stack.move_clock(day0 + hours(9))   # the sandbox clock (`axiom sandbox clock advance`)
    await asyncio.to_thread(stack.spool, campaign(stack, ...))
    await stack.deliver_due(deadline)          # claim and deliver what is due now
    await stack.stop()

A SQLite database (models.db), the sandbox world (sandbox/world.py: DNS and the simulated
providers on a private loopback network, its state file under the stack's home), the relay's
delivery engine run a round at a time (as tests/integration/test_sandbox_delivery.py runs it)
and, unless told otherwise, the relay's inbound listener, so the complaint reports the
simulated providers send come back into the relay's events. The world's clock object is the
relay's too: one offset, in the database, moved by this harness. Two stacks run side by side in
one process (testbed/experiment.py: the same traffic governed and ungoverned); each has its own
database, world, ports and home.

Shared by testbed/warmup_month.py and testbed/experiment.py; no pytest here.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import insert
from sqlmodel import Session

from models import Message, Recipient
from models.db import make_engine, migrate, session_scope
from models.sandbox_clock import set_offset

# A permanent refusal in one of these categories is a block (protocol/warmup.py counts them so).
BLOCK_CATEGORIES = {"reputation", "blocklisted"}


@dataclass
class Tally:
    """One source IP's (or stream's) answers at the campaign's providers, from the relay's events."""

    delivered: int = 0
    deferred: int = 0  # temporary failures (rate limits, the day's allowance, reputation)
    blocked: int = 0  # refused as blocked (permanent reputation or blocklist refusals)
    refused: int = 0  # every other permanent refusal

    def add(self, category: str, permanent: bool | None, n: int) -> None:
        if category == "delivered":
            self.delivered += n
        elif permanent:
            if category in BLOCK_CATEGORIES:
                self.blocked += n
            else:
                self.refused += n
        else:
            self.deferred += n


@dataclass(frozen=True)
class Outgoing:
    """One campaign's worth of messages of one tenant's stream, as its application submits it."""

    tenant_id: int
    stream: str
    domain: str  # the sending (From and MAIL FROM) domain
    sender: str
    recipients: list[str]
    per_message: int  # recipients per message, all at one provider (one SMTP transaction)
    subject: str


class SandboxStack:
    def __init__(
        self,
        root: Path,
        *,
        reactions: bool = True,
        inbound: bool = True,
        hostname: str = "relay.axiom.test",
    ):
        self.root = root
        self.reactions = reactions
        self.inbound = inbound
        self.hostname = hostname
        self.db_path = root / "axiom.db"
        self.db_url = f"sqlite:///{self.db_path}"
        self.engine = None
        self.world = None
        self.delivery = None
        self.settings = None
        self.keys: dict[str, list] = {}
        self._exit = contextlib.AsyncExitStack()
        self._wide = None
        self._narrow = None
        # Queue ids (and so Message-IDs) from a seeded sequence: two stacks given the same
        # traffic give it the same ids, so the world draws the same placement and the same
        # complaints for each message in both (sandbox/placement.py draws per Message-ID),
        # and a run repeats.
        self._ids = random.Random(0)

    # ------------------------------------------------------------------ start and stop
    async def start(
        self,
        seed: Callable[[Session, object], None],
        *,
        at: datetime,
        narrow_in_flight: int | None = None,
        database: Path | None = None,
        secret: str | None = None,
    ) -> None:
        """Seed the database (`seed(session, keybox)`, committed here), start the world and the
        relay's parts, and put the clock at `at`. database: a seeded database to start from
        (copied; `secret` must be the one its keys were sealed with), else an empty migrated
        one. narrow_in_flight: a second delivery spec working on that many recipients at once
        (deliver_due(narrow=True))."""
        from relay.delivery.dns import Resolver
        from relay.delivery.egress import Egress
        from relay.delivery.engine import DeliveryEngine
        from relay.submission.keystore import KeyBox
        from runbooks import loader
        from sandbox.testing import free_dns_port, world_settings
        from sandbox.world import SandboxWorld

        self.root.mkdir(parents=True, exist_ok=True)
        source = database or await asyncio.to_thread(migrated_template)
        await asyncio.to_thread(copy_database, source, self.db_path)
        self.engine = make_engine(self.db_url)
        secret = secret or KeyBox.generate()
        keybox = KeyBox(secret)

        def seeded() -> None:
            with session_scope(self.engine) as s:
                seed(s, keybox)
                s.commit()

        await asyncio.to_thread(seeded)
        dns = f"127.0.0.1:{free_dns_port()}"
        inbound = f"127.0.0.1:{free_dns_port()}"
        self.settings = world_settings(
            self.root / "home",
            database_url=self.db_url,
            secret_key=secret,
            hostname=self.hostname,
            sandbox_dns_listen=dns,
            dns_nameservers=[dns],
            # Complaint reports go to the relay's inbound listener (started below).
            sandbox_feedback_smtp=inbound,
        )
        self.world = SandboxWorld(self.settings)
        await self.world.start()
        self._exit.push_async_callback(self.world.stop)
        await self.world.refresh()  # the IPs' PTR names, the domains' SPF, DKIM, DMARC
        self._exit.enter_context(relay_patches("aiosmtplib"))  # as `axiom relay` has it
        await self.move_clock(at)
        shaping = loader.shaping()
        spec = shaping.spec if self.reactions else shaping.spec.model_copy(update={"reactions": []})
        self.delivery = DeliveryEngine(
            engine=self.engine,
            resolver=Resolver.at([self.world.dns_address], timeout=1.0, lifetime=2.0),
            clock=self.world.clock,
            hostname=self.hostname,
            delivery_port=self.world.port,
            delivery=loader.delivery().spec,
            shaping=spec,
            shaping_version=shaping.version,
            egress=Egress(self.engine, self.world.clock),
        )
        self._exit.callback(self.delivery.outcomes.stop)
        self._wide = self.delivery.spec
        if narrow_in_flight is not None:
            self._narrow = self._wide.model_copy(
                update={"max_in_flight": narrow_in_flight, "claim_batch": narrow_in_flight}
            )
        if self.inbound:
            await self._start_inbound(inbound)
        from relay.submission.auth import CredentialCache
        from relay.submission.policy import PolicyStore

        policy = PolicyStore(self.engine, keybox, CredentialCache(secret, 60))
        with relay_patches("dkimpy"):
            for domain in self._domains():
                self.keys[domain] = policy.signing_keys(domain)

    def _domains(self) -> list[str]:
        from sqlmodel import select

        from models import Domain

        with Session(self.engine) as s:
            return list(s.exec(select(Domain.name)).all())

    async def _start_inbound(self, address: str) -> None:
        """The relay's inbound listener (bounces and complaint reports), as relay/service.py
        serves it, on the clock of this stack."""
        from relay.inbound.listener import InboundHandler
        from relay.submission.server import ConnectionCounter, SessionLimits, make_protocol_factory

        host, port = address.rsplit(":", 1)
        factory = make_protocol_factory(
            InboundHandler(self._inbound_context()),
            hostname=self.hostname,
            data_size_limit=self.settings.inbound_max_message_size,
            starttls_context=None,
            implicit_tls=False,
            limits=SessionLimits(ConnectionCounter(100), 300.0),
            offer_auth=False,
        )
        server = await asyncio.get_running_loop().create_server(factory, host, int(port))

        async def close() -> None:
            server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await server.wait_closed()

        self._exit.push_async_callback(close)

    def _inbound_context(self):
        """relay/service.py build_inbound_context's, with metrics of its own: the process's
        registry takes each metric once, and two stacks (or a test module) run in a process."""
        from prometheus_client import Counter

        from relay.delivery.return_path import Tagger
        from relay.inbound.feedback import Recording
        from relay.inbound.listener import InboundContext, Mailbox
        from relay.metrics import InboundMetrics
        from runbooks.loader import delivery

        settings = self.settings
        metrics = InboundMetrics(
            reports=Counter("reports", "inbound reports", ["kind", "matched"], registry=None),
            rejected=Counter("rejected", "inbound refusals", ["reason"], registry=None),
        )
        return InboundContext(
            engine=self.engine,
            clock=self.world.clock,
            feedback=Mailbox.of(settings.feedback_mailbox),
            bounces=Mailbox.of(settings.bounce_mailbox),
            dmarc=Mailbox.of(settings.dmarc_mailbox),
            metrics=metrics,
            recording=Recording(
                hostname=settings.hostname,
                tagger=Tagger(settings.load_secret_key()),
                dsn_from_local_part=delivery().spec.dsn_from_local_part,
            ),
        )

    async def stop(self) -> None:
        if self.delivery is not None:
            with contextlib.suppress(Exception):
                await self.delivery.drain()
                await self.delivery.pool.close_all()
        await self._exit.aclose()
        if self.engine is not None:
            self.engine.dispose()

    # ------------------------------------------------------------------ the clock
    def now(self) -> datetime:
        return self.world.clock.now()

    async def move_clock(self, to: datetime) -> None:
        """The sandbox clock to `to` (what `axiom sandbox clock advance` writes), read at once
        by the world and the relay (their shared clock object) rather than within a second."""
        offset = to.timestamp() - time.time()
        await asyncio.to_thread(set_offset, self.engine, offset)
        await asyncio.to_thread(self.world.clock.refresh)
        if self.delivery is not None:
            # The relay's egress snapshot lives 2 s of real time and does not compare a
            # suspension's end with the clock: after a jump of hours it would postpone mail
            # "until" a time already past, again and again, for those 2 s.
            self.delivery.egress.invalidate()

    # ------------------------------------------------------------------ mail
    def spool(self, batches: Iterable[Outgoing], now: datetime) -> int:
        """Sign each campaign as the submission server signs it and spool it as it would be
        (per_message recipients of one provider a message); the recipients spooled."""
        from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
        from relay.submission.dkim import sign
        from runbooks import loader

        spec = loader.dkim_signing().spec
        entries = []
        count = 0
        with relay_patches("dkimpy"):
            for out in batches:
                count += len(out.recipients)
                for n in range(0, len(out.recipients), out.per_message):
                    batch = out.recipients[n : n + out.per_message]
                    queue_id = new_queue_id(now.timestamp(), self._ids)
                    body = (
                        f"From: {out.domain.split('.')[0].title()} <{out.sender}>\r\n"
                        f"To: <{out.sender}>\r\n"
                        f"Subject: {out.subject}\r\n"
                        f"Message-ID: <{queue_id}@{out.domain}>\r\n"
                        f"Date: {now:%a, %d %b %Y %H:%M:%S +0000}\r\n"
                        f"\r\nHere is what is new today.\r\n"
                    ).encode()
                    data = sign(body, self.keys[out.domain], spec) + body
                    entries.append(
                        SpoolEntry(
                            queue_id,
                            out.tenant_id,
                            out.stream,
                            out.sender,
                            batch,
                            out.domain,
                            f"<{queue_id}@{out.domain}>",
                            data,
                            "127.0.0.1",
                            f"tenant-{out.tenant_id}-app",
                            created_at=now,
                        )
                    )
        if entries:
            messages, rows = spool_rows(entries)
            with self.engine.begin() as conn:
                conn.execute(insert(Message), messages)
                conn.execute(insert(Recipient), rows)
        return count

    async def deliver_due(
        self, deadline: float, *, narrow: bool = False, rounds: int = 2000
    ) -> int:
        """Claim and deliver what is due now until nothing is (DSNs are due at once), bounded
        in rounds and in real time; narrow: the narrow spec (start's narrow_in_flight)."""
        self.delivery.spec = self._narrow if narrow and self._narrow else self._wide
        total = 0
        for _ in range(rounds):
            claimed = await self.delivery.run_once()
            await self.delivery.drain()
            total += claimed
            if not claimed or time.monotonic() > deadline:
                break
        await self.delivery.pool.close_all()
        return total


def existing_recipients(prefix: str, domain: str, count: int) -> list[str]:
    """count addresses at domain that have a mailbox in the world (it draws a stable share of
    unknown mailboxes, sandbox/mailbox.py; an engaged list has none): prefix0@, prefix1@, …"""
    from sandbox.behaviour import behaviour
    from sandbox.mailbox import mailbox_exists

    share = behaviour().provider_for_domain(domain).unknown_mailbox_share
    found: list[str] = []
    for k in range(count * 3 + 100):  # at a 2-5 % share, three times as many is ample
        address = f"{prefix}{k}@{domain}"
        if mailbox_exists(address, share):
            found.append(address)
            if len(found) == count:
                break
    return found


_TEMPLATE: Path | None = None


def migrated_template() -> Path:
    """An empty database at the schema's head, made once per process (a migration takes
    seconds; a copy, milliseconds)."""
    global _TEMPLATE
    if _TEMPLATE is None or not _TEMPLATE.exists():
        folder = Path(tempfile.mkdtemp(prefix="axiom-template-", dir=fast_dir()))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / "template.db"
        migrate(f"sqlite:///{path}")
        _TEMPLATE = path
    return _TEMPLATE


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database, its write-ahead log included (the backup API)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def fast_dir() -> str | None:
    """A memory-backed directory for a run's files when there is one: the relay's SQLite
    commits wait for the disk (synchronous=FULL), which this does not measure, and make a
    simulated month a third slower."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


@contextlib.contextmanager
def relay_patches(*libraries: str):
    """The relay's library patches while inside (as tests/patching.py's `patched`): the
    relay's code signs and sends with them; the world in this process verifies with the
    libraries as published once they are off again."""
    from relay import patches

    before = set(patches.installed(*libraries))
    patches.install(*libraries)
    try:
        yield
    finally:
        added = [name for name in patches.installed(*libraries) if name not in before]
        if added:
            patches.uninstall(*added)
