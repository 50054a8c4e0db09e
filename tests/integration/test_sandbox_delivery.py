"""The relay's delivery engine into the simulated world: the Resolver points at the sandbox DNS by
setting, mail leaves from pool IPs on loopback, and the simulated providers judge it.

Runs on SQLite and PostgreSQL: the world reads the relay's database for its DNS (source IPs
and PTR names, the sending domain's DKIM/SPF/DMARC records), as it does under `axiom up`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select
from sqlmodel import Session

from config.clock import SystemClock
from models import (
    AuditEntry,
    DeliveryEvent,
    IpAddress,
    IpPool,
    IpState,
    Message,
    Recipient,
    RecipientState,
    Suspension,
)
from protocol import domains, egress, tenants
from relay.delivery.dns import Resolver
from relay.delivery.egress import Egress
from relay.delivery.engine import DeliveryEngine
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from relay.submission.auth import CredentialCache
from relay.submission.dkim import sign
from relay.submission.keystore import KeyBox
from relay.submission.policy import PolicyStore
from runbooks import loader
from sandbox.behaviour import behaviour
from sandbox.mailbox import mailbox_exists
from sandbox.testing import world_settings
from sandbox.world import SandboxWorld
from tests.patching import patched

pytestmark = pytest.mark.integration

DOMAIN = "acme.example"
PTR = {"127.0.0.10": "mta10.axiom.test", "127.0.0.11": "mta11.axiom.test"}


class Relay:
    """The relay's side: a tenant with an active, signed domain and a delivery engine."""

    def __init__(self, engine, world: SandboxWorld, tenant_id: int, keybox: KeyBox, secret):
        self.engine = engine
        self.world = world
        self.tenant_id = tenant_id
        self.policy = PolicyStore(engine, keybox, CredentialCache(secret, 60))
        shaping = loader.shaping()
        self.delivery = DeliveryEngine(
            engine=engine,
            resolver=Resolver.at([world.dns_address], timeout=1.0, lifetime=2.0),
            clock=SystemClock(),
            hostname="relay.axiom.test",
            delivery_port=world.port,
            delivery=loader.delivery().spec,
            shaping=shaping.spec,
            shaping_version=shaping.version,
            egress=Egress(engine, SystemClock(), ttl=0),
        )

    def submit(self, rcpt: str, n: int = 0) -> str:
        """Spool one message signed with the domain's keys, as the submission server does."""
        queue_id = new_queue_id()
        body = (
            f"From: Shop <shop@{DOMAIN}>\r\nTo: <{rcpt}>\r\nSubject: Order {n}\r\n"
            f"Message-ID: <{queue_id}@{DOMAIN}>\r\nDate: Thu, 26 Nov 2026 09:00:00 +0000\r\n"
            f"\r\nYour order {n} has shipped.\r\n"
        ).encode()
        with patched("dkimpy"):  # signed as the relay signs; the world verifies with stock dkimpy
            keys = self.policy.signing_keys(DOMAIN)
            data = sign(body, keys, loader.dkim_signing().spec) + body
        entry = SpoolEntry(
            queue_id,
            self.tenant_id,
            "transactional",
            f"shop@{DOMAIN}",
            [rcpt],
            DOMAIN,
            f"<{queue_id}@{DOMAIN}>",
            data,
            "127.0.0.1",
            "acme-app",
            created_at=datetime.now(UTC),
        )
        messages, rows = spool_rows([entry])
        with self.engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), rows)
        return queue_id

    async def deliver(self, rounds: int = 4) -> None:
        for _ in range(rounds):
            claimed = await self.delivery.run_once()
            await self.delivery.drain()
            if not claimed:
                break
        await self.delivery.pool.close_all()

    def rows(self, model, *where):
        with Session(self.engine) as s:
            return list(s.exec(select(model).where(*where)).scalars())


def existing(domain: str, count: int) -> list[str]:
    share = behaviour().provider_for_domain(domain).unknown_mailbox_share
    found = (f"cust{k}@{domain}" for k in range(count * 2 + 100))
    return [a for a in found if mailbox_exists(a, share)][:count]


def seed(engine, keybox: KeyBox, ips: list[str]) -> int:
    with Session(engine) as s:
        egress.ensure_default_pool(s)
        tenant = tenants.add_tenant(s, "acme")
        domains.add_domain(s, keybox, "acme", DOMAIN)
        domains.mark_domain_active(s, DOMAIN, "tests", "fixture")
        pool = s.exec(select(IpPool).where(IpPool.name == "default")).scalars().one()
        for ip in s.exec(select(IpAddress).where(IpAddress.pool_id == pool.id)).scalars():
            s.delete(ip)
        s.flush()
        for address in ips:
            s.add(
                IpAddress(
                    address=address, pool_id=pool.id, ptr_name=PTR[address], state=IpState.active
                )
            )
        s.commit()
        return tenant.id


@pytest.fixture
async def relay_and_world(engine, db_url, tmp_path, request):
    ips = getattr(request, "param", ["127.0.0.10", "127.0.0.11"])
    secret = KeyBox.generate()
    keybox = KeyBox(secret)
    tenant_id = await asyncio.to_thread(seed, engine, keybox, ips)
    settings = world_settings(tmp_path / "home", database_url=db_url)
    world = SandboxWorld(settings)
    await world.start()
    try:
        await world.refresh()  # reads the database: PTR names, SPF, DKIM keys
        with patched("aiosmtplib"):  # the delivery engine's, as `axiom relay` installs it
            yield Relay(engine, world, tenant_id, keybox, secret)
    finally:
        await world.stop()


async def test_signed_mail_is_delivered_to_the_simulated_gmail_and_passes_authentication(
    relay_and_world,
):
    relay = relay_and_world
    [rcpt] = existing("gmail.com", 1)
    queue_id = await asyncio.to_thread(relay.submit, rcpt)
    await relay.deliver()
    [recipient] = relay.rows(Recipient, Recipient.message_id == queue_id)
    assert recipient.state == RecipientState.delivered, recipient.last_reply
    assert recipient.last_reply.startswith("250 ") and "- gsmtp" in recipient.last_reply
    [event] = relay.rows(DeliveryEvent, DeliveryEvent.message_id == queue_id)
    assert (event.category, event.provider, event.mx_host) == (
        "delivered",
        "google",
        "gmail-smtp-in.l.google.com",
    )
    assert event.source_ip in PTR
    [stored] = relay.world.mailboxes.messages("google")
    assert stored.recipient == rcpt
    results = str(stored.headers["Authentication-Results"])
    assert results.count("dkim=pass header.d=acme.example") == 2  # RSA and Ed25519
    assert "spf=pass smtp.mailfrom=acme.example" in results
    assert "dmarc=pass (p=NONE) header.from=acme.example" in results
    received = str(stored.headers["Received"])
    assert f"from {PTR[event.source_ip]}" in received and "with ESMTPS" in received


@pytest.mark.parametrize("relay_and_world", [["127.0.0.10"]], indirect=True)
async def test_a_cold_ip_is_rate_limited_and_the_relay_suspends_the_path(relay_and_world):
    relay = relay_and_world
    # a cold IP's day arrives at once (the short-term bucket holds the day's allowance),
    # then the day's limit answers with the rate-limit reply
    daily = behaviour().reputation.daily
    burst = int(daily.burst_share * daily.cold_allowance)
    rcpts = existing("gmail.com", burst + 10)
    ids = [await asyncio.to_thread(relay.submit, rcpt, n) for n, rcpt in enumerate(rcpts)]
    await relay.deliver()
    recipients = relay.rows(Recipient, Recipient.message_id.in_(ids))
    delivered = [r for r in recipients if r.state == RecipientState.delivered]
    assert burst <= len(delivered) <= burst + 2  # a token may come back while we send
    deferred = [r for r in recipients if r.state == RecipientState.queued]
    assert deferred and all(r.state != RecipientState.bounced for r in recipients)
    limited = [r for r in deferred if r.attempts]
    assert limited and limited[0].last_reply.startswith("421 4.7.28")
    assert "Gmail has detected an unusual rate" in limited[0].last_reply
    # the rest were held back without an attempt: the path is suspended
    events = relay.rows(DeliveryEvent, DeliveryEvent.category == "rate_limited")
    assert {e.provider for e in events} == {"google"}
    suspensions = relay.rows(Suspension, Suspension.rule_id == "google-unusual-rate")
    assert suspensions
    assert {(s.source_ip, s.provider, s.action) for s in suspensions} == {
        ("127.0.0.10", "google", "suspend")
    }
    audit = relay.rows(AuditEntry, AuditEntry.actor == "relay:reaction:google-unusual-rate")
    assert audit and {a.subject for a in audit} == {"path:127.0.0.10/google"}


@pytest.mark.parametrize("relay_and_world", [["127.0.0.10"]], indirect=True)
async def test_a_listed_ip_bounces_at_outlook_and_the_dsn_reaches_the_sender(relay_and_world):
    relay = relay_and_world
    relay.world.reputation.set_score(["microsoft", "generic"], "127.0.0.10", 90)
    relay.world.state.list("zen.spamhaus.org", "127.0.0.10", "127.0.0.2", "test")
    await relay.world.refresh()
    [rcpt] = existing("outlook.com", 1)
    queue_id = await asyncio.to_thread(relay.submit, rcpt)
    await relay.deliver()
    [recipient] = relay.rows(Recipient, Recipient.message_id == queue_id)
    assert recipient.state == RecipientState.bounced
    assert recipient.last_reply.startswith("550 5.7.1")
    assert "Client host [127.0.0.10] blocked using Spamhaus" in recipient.last_reply
    [event] = relay.rows(DeliveryEvent, DeliveryEvent.message_id == queue_id)
    assert (event.category, event.permanent) == ("blocklisted", True)
    # The DSN goes to shop@acme.example, whose MX is the sandbox's inbound receiver; it is
    # refused there too (same listed IP): the world is consistent, the relay does not loop.
    dsn_events = relay.rows(DeliveryEvent, DeliveryEvent.recipient == f"shop@{DOMAIN}")
    assert dsn_events and dsn_events[0].reply_code == 554
    assert "Client host [127.0.0.10] blocked using zen.spamhaus.org" in dsn_events[0].reply_text
    relay.world.state.unlist("zen.spamhaus.org", "127.0.0.10")
    await relay.world.refresh()
    [again] = existing("outlook.com", 2)[1:]
    second = await asyncio.to_thread(relay.submit, again, 1)
    await relay.deliver()
    [ok] = relay.rows(Recipient, Recipient.message_id == second)
    assert ok.state == RecipientState.delivered, ok.last_reply
