"""The delivery engine against a real Postfix as the receiving MX, and against warm-up caps.

Postfix is the receiver here (not smtp-sink) because it is what a real MX runs: it delivers into
a mailbox file, logs the client address it saw, negotiates STARTTLS and logs every command of
every session, so the tests read what the far end observed rather than what the engine says.
"""

from __future__ import annotations

import os
import pwd
import re
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlmodel import Session

from config.tls import write_self_signed
from models import IpAddress, IpPool, RecipientState, Stream, WarmupDay, WarmupPlan
from testbed.dns import knot  # noqa: F401  (fixture)
from testbed.postfix import PostfixInstance
from tests.integration.delivery_world import DeliveryWorld, make_world, mx_zones

pytestmark = pytest.mark.integration

MAILBOX_DOMAIN = "mailbox.test"
MAILBOX_MX = ("mx.mailbox.test", "127.0.0.56")
TLS_DOMAIN = "tls.test"
TLS_MX = ("mx.tls.test", "127.0.0.57")
BROKEN_TLS_DOMAIN = "brokentls.test"
BROKEN_TLS_MX = ("mx.brokentls.test", "127.0.0.58")


def _receiving_postfix(
    world: DeliveryWorld, name: str, domain: str, address: str, tls: str | None = None
) -> PostfixInstance:
    """A Postfix MX for domain at address:<the world's delivery port>; every recipient of the
    domain lands in one mbox file, ROOT/vmail/inbox. tls: None (no STARTTLS), "ok" (a
    self-signed certificate) or "broken" (STARTTLS offered, every handshake fails)."""
    postfix_user = pwd.getpwnam("postfix")
    instance = PostfixInstance(
        name,
        host=address,
        smtpd_port=world.port,
        hostname=f"mx.{domain}",
        main_cf={
            # inet_interfaces must name an address configured on an interface, and only
            # 127.0.0.1 is; the smtpd listener binds host:port explicitly in master.cf.
            "inet_interfaces": "all",
            "virtual_mailbox_domains": domain,
            "virtual_mailbox_maps": "static:inbox",
            "virtual_uid_maps": f"static:{postfix_user.pw_uid}",
            "virtual_gid_maps": f"static:{postfix_user.pw_gid}",
            "smtpd_tls_received_header": True,
        },
        master_cf=["virtual   unix  -       n       n       -       -       virtual"],
    )
    vmail = instance.root / "vmail"
    vmail.mkdir()
    os.chown(vmail, postfix_user.pw_uid, postfix_user.pw_gid)
    instance.main_cf_overrides["virtual_mailbox_base"] = vmail
    if tls is not None:
        cert, key = instance.conf_dir / "cert.pem", instance.conf_dir / "key.pem"
        write_self_signed(cert, key, f"mx.{domain}")
        instance.main_cf_overrides.update(
            smtpd_tls_security_level="may", smtpd_tls_cert_file=cert, smtpd_tls_key_file=key
        )
        if tls == "broken":
            # Offered, never negotiable: only TLS 1.0, which no current client speaks. The
            # server advertises STARTTLS, answers 220, then the handshake fails.
            instance.main_cf_overrides["smtpd_tls_protocols"] = "<=TLSv1"
    return instance.start()


def _mailbox(instance: PostfixInstance) -> bytes:
    path = instance.root / "vmail" / "inbox"
    return path.read_bytes() if path.exists() else b""


def _sessions(instance: PostfixInstance) -> list[str]:
    """Postfix's end-of-session lines: 'disconnect from NAME[ADDR] ehlo=1 starttls=1 ...'."""
    return re.findall(r"disconnect from \S+ .*", instance.log())


@pytest.fixture
def world(engine, knot):  # noqa: F811
    w = make_world(
        engine,
        knot,
        extra_zones={
            **mx_zones(MAILBOX_DOMAIN, *MAILBOX_MX),
            **mx_zones(TLS_DOMAIN, *TLS_MX),
            **mx_zones(BROKEN_TLS_DOMAIN, *BROKEN_TLS_MX),
        },
    )
    yield w
    w.stop()


@pytest.fixture
def peers():
    started: list[PostfixInstance] = []
    yield started
    for instance in started:
        instance.stop()


def test_postfix_mx_stores_the_message_and_sees_the_chosen_source_ip(world, peers):
    mx = _receiving_postfix(world, "mailbox-mx", MAILBOX_DOMAIN, MAILBOX_MX[1])
    peers.append(mx)
    qid = world.submit([f"ann@{MAILBOX_DOMAIN}"], body="Parcel 4711 is on its way.")
    world.run()

    [rcpt] = world.recipients(qid)
    assert rcpt.state == RecipientState.delivered, rcpt.last_reply
    [event] = world.events()
    assert event.source_ip in ("127.0.0.10", "127.0.0.11")
    assert event.mx_host == MAILBOX_MX[0] and event.reply_code == 250
    # Postfix accepted it from the address the engine chose, and its virtual agent stored it.
    mx.wait_for_log(rf"client=unknown\[{re.escape(event.source_ip)}\]")
    mx.wait_for_log(rf"to=<ann@{re.escape(MAILBOX_DOMAIN)}>.*relay=virtual.*status=sent")
    mailbox = _mailbox(mx)
    assert b"Parcel 4711 is on its way." in mailbox
    assert f"Message-ID: <{qid}@acme.example>".encode() in mailbox
    # The Received header Postfix wrote names the source IP and its PTR name as EHLO.
    ptr = f"mta{event.source_ip.rsplit('.', 1)[1]}.axiom.test"
    assert re.search(
        rf"Received: from {re.escape(ptr)} \(unknown \[{re.escape(event.source_ip)}\]\)".encode(),
        mailbox,
    ), mailbox.decode(errors="replace")
    # The 250 the engine recorded is Postfix's own "queued as" reply.
    assert "queued as" in (event.reply_text or "")


def test_opportunistic_starttls_is_used_when_offered(world, peers):
    mx = _receiving_postfix(world, "tls-mx", TLS_DOMAIN, TLS_MX[1], tls="ok")
    peers.append(mx)
    qid = world.submit([f"bea@{TLS_DOMAIN}"])
    world.run()

    [rcpt] = world.recipients(qid)
    assert rcpt.state == RecipientState.delivered, rcpt.last_reply
    [event] = world.events()
    mx.wait_for_log(
        rf"TLS connection established from unknown\[{re.escape(event.source_ip)}\]: TLSv1\.[23]"
    )
    mx.wait_for_log(r"status=sent")
    [session] = _sessions(mx)
    assert "starttls=1 " in session and "data=1 " in session
    # The message itself travelled encrypted: Postfix's Received header says with what.
    assert re.search(rb"\(using TLSv1\.[23] with cipher", _mailbox(mx))


def test_broken_starttls_falls_back_to_plaintext_and_is_remembered(world, peers):
    mx = _receiving_postfix(world, "broken-tls-mx", BROKEN_TLS_DOMAIN, BROKEN_TLS_MX[1], "broken")
    peers.append(mx)
    first = world.submit([f"cai@{BROKEN_TLS_DOMAIN}"], body="first")
    world.run()  # ends by closing every session, so the next message needs a new one

    assert world.recipients(first)[0].state == RecipientState.delivered
    mx.wait_for_log(r"SSL_accept error")
    # Postfix logs a session's end a moment after the relay has its reply: wait for both.
    mx.wait_for_log(r"(?s)disconnect from .*disconnect from ")
    sessions = _sessions(mx)
    assert len(sessions) == 2, sessions
    # The handshake failed (starttls=0/1), then the same message went in plaintext.
    assert "starttls=0/1" in sessions[0] and "mail=" not in sessions[0]
    assert "starttls" not in sessions[1] and "data=1 " in sessions[1]

    second = world.submit([f"dan@{BROKEN_TLS_DOMAIN}"], body="second")
    world.run()  # the same engine: it remembers that this MX's TLS is broken

    assert world.recipients(second)[0].state == RecipientState.delivered
    mx.wait_for_log(r"(?s)status=sent.*status=sent")
    mx.wait_for_log(r"(?s)(disconnect from .*){3}")
    sessions = _sessions(mx)
    assert len(sessions) == 3, sessions
    assert "starttls" not in sessions[2] and "data=1 " in sessions[2]
    assert mx.log().count("SSL_accept error") == 1  # no second handshake was attempted
    mailbox = _mailbox(mx)
    assert b"first" in mailbox and b"second" in mailbox
    assert b"using TLS" not in mailbox
    assert [e.category for e in world.events()] == ["delivered", "delivered"]


# --------------------------------------------------------------------- warm-up caps
def _warmup(world: DeliveryWorld, *, fallback: bool, cap: int) -> tuple[int, int]:
    """Stream 'transactional' on pool 'warm' (127.0.0.10; 'shared' 127.0.0.11 as fallback if
    asked); 127.0.0.10 runs a warm-up plan capped at `cap` for google today. Returns the plan
    id and today's WarmupDay id."""
    with Session(world.engine) as s:
        pools = {p.name: p.id for p in s.exec(select(IpPool)).scalars()}
        s.add(
            Stream(
                tenant_id=world.tenant_id,
                name="transactional",
                pool_id=pools["warm"],
                fallback_pool_id=pools["shared"] if fallback else None,
            )
        )
        ip = s.exec(select(IpAddress).where(IpAddress.address == "127.0.0.10")).scalars().one()
        plan = WarmupPlan(
            ip_id=ip.id,
            schedule_id="sandbox",  # opens the whole day at 00:00 (no hourly spread)
            runbook_version="1.0",
            started_on=world.clock.now().date(),
        )
        s.add(plan)
        s.flush()
        day = WarmupDay(plan_id=plan.id, day=world.clock.now().date(), provider="google", cap=cap)
        s.add(day)
        s.commit()
        return plan.id, day.id


def _warmup_days(world: DeliveryWorld) -> dict:
    with Session(world.engine) as s:
        # The relay writes the day's other providers' rows itself (at the plan's caps).
        rows = s.exec(select(WarmupDay).where(WarmupDay.provider == "google")).scalars()
        return {d.day: d.sent for d in rows}


@pytest.fixture
def warm_world(engine, knot):  # noqa: F811
    w = make_world(engine, knot, pools={"warm": ["127.0.0.10"], "shared": ["127.0.0.11"]})
    yield w
    w.stop()


def _client_addresses(messages: list[bytes]) -> Counter:
    found = Counter()
    for message in messages:
        match = re.search(rb"^X-Client-Addr: (\S+)", message, re.MULTILINE)
        assert match, message[:300]
        found[match.group(1).decode()] += 1
    return found


def test_warmup_cap_reached_overflows_to_the_fallback_pool(warm_world):
    world = warm_world
    _warmup(world, fallback=True, cap=2)
    sink = world.sink("gmail.com")
    for i in range(5):
        world.submit([f"user{i}@gmail.com"])
    world.run()

    assert {r.state for r in world.recipients()} == {RecipientState.delivered}
    events = world.events()
    assert Counter(e.source_ip for e in events) == {"127.0.0.10": 2, "127.0.0.11": 3}
    assert _client_addresses(sink.messages()) == {"127.0.0.10": 2, "127.0.0.11": 3}
    assert _warmup_days(world) == {world.clock.now().date(): 2}


def test_warmup_cap_without_fallback_waits_for_the_next_day(warm_world):
    world = warm_world
    plan_id, _ = _warmup(world, fallback=False, cap=2)
    sink = world.sink("gmail.com")
    for i in range(5):
        world.submit([f"user{i}@gmail.com"])
    world.run()

    today = world.clock.now().date()
    delivered = [r for r in world.recipients() if r.state == RecipientState.delivered]
    waiting = [r for r in world.recipients() if r.state == RecipientState.queued]
    assert len(delivered) == 2 and len(waiting) == 3
    for r in waiting:  # postponed: no attempt spent, and the row says why
        assert r.attempts == 0 and r.lease_owner is None
        assert "warm-up cap of 2 for google" in (r.last_reply or ""), r.last_reply
        assert r.next_attempt_at.replace(tzinfo=None) > world.clock.now().replace(tzinfo=None)
    assert len(world.events()) == 2  # no delivery event for mail that was not attempted
    assert _client_addresses(sink.messages()) == {"127.0.0.10": 2}
    assert _warmup_days(world) == {today: 2}

    # Later the same day: still capped, still no attempt.
    world.clock.advance(3600)
    world.run()
    assert sorted(r.attempts for r in world.recipients()) == [0, 0, 0, 1, 1]
    assert len(sink.messages()) == 2

    # The next day the Protocol writes the new day's cap; the waiting mail goes out.
    world.clock.advance(timedelta(days=1).total_seconds())
    tomorrow = world.clock.now().date()
    with Session(world.engine) as s:
        s.add(WarmupDay(plan_id=plan_id, day=tomorrow, provider="google", cap=4))
        s.commit()
    world.run()
    assert {r.state for r in world.recipients()} == {RecipientState.delivered}
    assert _client_addresses(sink.messages()) == {"127.0.0.10": 5}
    assert _warmup_days(world) == {today: 2, tomorrow: 3}
    assert sorted(r.attempts for r in world.recipients()) == [1] * 5
