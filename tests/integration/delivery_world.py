"""A small receiving world on loopback for delivery tests: Knot DNS, receivers, source IPs.

Every receiver listens on the same port (AXIOM_DELIVERY_PORT is one setting, as port 25 is in
production) at its own loopback address, and Knot serves MX/A/PTR for the domains. The
delivery engine runs in-process with a manual clock, so retries days apart take no time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, select
from sqlmodel import Session

from config.clock import ManualClock
from models import DeliveryEvent, IpAddress, IpPool, IpState, Recipient, Tenant
from relay.delivery.dns import Resolver
from relay.delivery.egress import Egress
from relay.delivery.engine import DeliveryEngine
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from runbooks import loader
from testbed.dns import KnotServer, merge_zones, ptr_zones
from testbed.postfix import SmtpSink, free_port
from tests.patching import patched

# The MX host names are the providers' real ones, so provider identification is exercised.
RECEIVERS = {
    "gmail.com": ("gmail-smtp-in.l.google.com", "127.0.0.50"),
    "yahoo.com": ("mta5.am0.yahoodns.net", "127.0.0.51"),
    "example.org": ("mx.example.org", "127.0.0.52"),
    "unknown-users.test": ("mx.unknown-users.test", "127.0.0.53"),
    "deferring.test": ("mx.deferring.test", "127.0.0.54"),
    "outlook.com": ("outlook-com.olc.protection.outlook.com", "127.0.0.55"),
}
SOURCE_IPS = {"127.0.0.10": "mta10.axiom.test", "127.0.0.11": "mta11.axiom.test"}


def world_zones(extra: dict | None = None) -> dict:
    zones: dict[str, list] = {}
    for domain, (mx_host, address) in RECEIVERS.items():
        zones.setdefault(domain, []).append(("@", "MX", f"10 {mx_host}."))
        mx_zone = ".".join(mx_host.split(".")[-2:])
        zones.setdefault(mx_zone, []).append((f"{mx_host}.", "A", address))
    zones["nullmx.test"] = [("@", "MX", "0 .")]
    return merge_zones(zones, ptr_zones(SOURCE_IPS), extra or {})


def mx_zones(domain: str, mx_host: str, address: str) -> dict:
    """Extra zones for make_world: domain's MX is mx_host, which resolves to address."""
    mx_zone = ".".join(mx_host.split(".")[-2:])
    return merge_zones(
        {domain: [("@", "MX", f"10 {mx_host}.")]}, {mx_zone: [(f"{mx_host}.", "A", address)]}
    )


@dataclass
class DeliveryWorld:
    engine: Engine
    knot: KnotServer
    port: int
    clock: ManualClock
    tenant_id: int
    sinks: dict[str, SmtpSink] = field(default_factory=dict)
    delivery: DeliveryEngine | None = None
    patches: ExitStack = field(default_factory=ExitStack)  # the relay's, until stop()

    def sink(self, domain: str, options: Iterable[str] = (), capture: bool = True) -> SmtpSink:
        """(Re)start the receiver for domain's MX with smtp-sink options."""
        old = self.sinks.pop(domain, None)
        if old is not None:
            old.stop()
        _, address = RECEIVERS[domain]
        sink = SmtpSink(list(options), host=address, port=self.port, capture=capture).start()
        self.sinks[domain] = sink
        return sink

    def build_engine(self) -> DeliveryEngine:
        self.patches.enter_context(patched("aiosmtplib"))  # as `axiom relay` installs it
        shaping = loader.shaping()
        self.delivery = DeliveryEngine(
            engine=self.engine,
            resolver=Resolver.at([self.knot.address], timeout=1.0, lifetime=2.0),
            clock=self.clock,
            hostname="relay.axiom.test",
            delivery_port=self.port,
            delivery=loader.delivery().spec,
            shaping=shaping.spec,
            shaping_version=shaping.version,
            egress=Egress(self.engine, self.clock, ttl=0),
        )
        return self.delivery

    def submit(
        self,
        recipients: list[str],
        *,
        sender: str = "shop@acme.example",
        stream: str = "transactional",
        body: str = "Your order has shipped.",
    ) -> str:
        queue_id = new_queue_id()
        data = (
            f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: order {queue_id}\r\n"
            f"Message-ID: <{queue_id}@acme.example>\r\n\r\n{body}\r\n"
        ).encode()
        entry = SpoolEntry(
            queue_id,
            self.tenant_id,
            stream,
            sender,
            recipients,
            "acme.example",
            f"<{queue_id}@acme.example>",
            data,
            "127.0.0.1",
            "acme-app",
            created_at=self.clock.now(),
        )
        messages, rows = spool_rows([entry])
        from sqlalchemy import insert

        from models import Message

        with self.engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), rows)
        return queue_id

    def run(self, rounds: int = 3) -> None:
        """Claim and deliver everything due now, a few rounds (DSNs are due right away)."""
        engine = self.delivery or self.build_engine()

        async def go():
            for _ in range(rounds):
                claimed = await engine.run_once()
                await engine.drain()
                if not claimed:
                    break
            await engine.pool.close_all()

        asyncio.run(go())

    def recipients(self, queue_id: str | None = None) -> list[Recipient]:
        with Session(self.engine) as s:
            stmt = select(Recipient).order_by(Recipient.id)
            if queue_id:
                stmt = stmt.where(Recipient.message_id == queue_id)
            return list(s.exec(stmt).scalars())

    def events(self) -> list[DeliveryEvent]:
        with Session(self.engine) as s:
            return list(s.exec(select(DeliveryEvent).order_by(DeliveryEvent.id)).scalars())

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.patches.close()


def make_world(
    engine: Engine,
    knot_factory,
    pools: dict[str, list[str]] | None = None,
    extra_zones: dict | None = None,
) -> DeliveryWorld:
    """A tenant 'acme', pools of source IPs (default: pool 'default' = 127.0.0.10, .11);
    extra_zones (e.g. from mx_zones) are served beside the world's own."""
    from protocol.egress import ensure_default_pool

    pools = pools or {"default": ["127.0.0.10", "127.0.0.11"]}
    with Session(engine) as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        ensure_default_pool(s)
        for name, addresses in pools.items():
            pool = s.exec(select(IpPool).where(IpPool.name == name)).scalars().first()
            if pool is None:
                pool = IpPool(name=name)
                s.add(pool)
                s.flush()
            for ip in s.exec(select(IpAddress).where(IpAddress.pool_id == pool.id)).scalars():
                s.delete(ip)
            s.flush()
            for address in addresses:
                s.add(
                    IpAddress(
                        address=address,
                        pool_id=pool.id,
                        ptr_name=SOURCE_IPS.get(address),
                        state=IpState.active,
                    )
                )
        s.commit()
        tenant_id = tenant.id
    knot = knot_factory(world_zones(extra_zones))
    clock = ManualClock(datetime(2026, 11, 26, 9, 0, tzinfo=UTC))
    return DeliveryWorld(engine, knot, free_port("127.0.0.50"), clock, tenant_id)
