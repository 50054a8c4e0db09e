"""The simulated receiving world on loopback: its DNS over the wire, and each provider's rules as
a sending MTA meets them over SMTP (real sockets, real source addresses, real DKIM signatures)."""

from __future__ import annotations

import asyncio
import time
from email import message_from_bytes, policy
from functools import cache
from pathlib import Path

import aiosmtplib
import dns.flags
import dns.message
import dns.query
import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

from relay.delivery.dns import Resolver
from relay.submission.dkim import generate_key, load_signing_key, sign, txt_record_value
from runbooks.loader import dkim_signing
from sandbox.behaviour import behaviour
from sandbox.mailbox import mailbox_exists
from sandbox.testing import free_dns_port, world_settings
from sandbox.world import SandboxWorld
from tests.patching import patched

pytestmark = pytest.mark.integration

SOURCES = {"127.0.0.10": "mta10.axiom.test", "127.0.0.11": "mta11.axiom.test"}
DOMAIN = "acme.example"


@cache
def keys():
    return generate_key("rsa", 2048), generate_key("ed25519")


def message(rcpt: str, n: int = 0, sender: str = f"shop@{DOMAIN}", signed: bool = True) -> bytes:
    data = (
        f"From: Shop <{sender}>\r\nTo: <{rcpt}>\r\nSubject: Order {n}\r\n"
        f"Message-ID: <{n}.{rcpt}@{DOMAIN}>\r\nDate: Thu, 26 Nov 2026 09:00:00 +0000\r\n\r\n"
        f"Your order {n} has shipped.\r\n"
    ).encode()
    if not signed:
        return data
    rsa, ed = keys()
    signing = [
        load_signing_key(DOMAIN, "axrsa", "rsa", rsa.private_material),
        load_signing_key(DOMAIN, "axed", "ed25519", ed.private_material),
    ]
    with patched("dkimpy"):  # signed as the relay signs; verified by dkimpy as published
        return sign(data, signing, dkim_signing().spec) + data


def publish_domain(world: SandboxWorld, dmarc: str = "v=DMARC1; p=none") -> None:
    """The customer's DNS, as `axiom domain records` asks them to publish it."""
    rsa, ed = keys()
    state = world.state
    state.override(
        f"axrsa._domainkey.{DOMAIN}", "TXT", [txt_record_value("rsa", rsa.public_value)], "t"
    )
    state.override(
        f"axed._domainkey.{DOMAIN}", "TXT", [txt_record_value("ed25519", ed.public_value)], "t"
    )
    state.override(DOMAIN, "TXT", ["v=spf1 include:_spf.relay.axiom.test ~all"], "t")
    state.override(f"_dmarc.{DOMAIN}", "TXT", [dmarc], "t")
    state.override("other.example", "TXT", ["v=spf1 -all"], "t")


@pytest.fixture
async def world(tmp_path):
    feedback_port = free_dns_port()
    settings = world_settings(
        tmp_path / "home",
        sandbox_feedback_smtp=f"127.0.0.1:{feedback_port}",
        sandbox_feedback_address="fbl@relay.axiom.test",
    )
    w = SandboxWorld(settings, source_ips=SOURCES)
    await w.start()
    publish_domain(w)
    await w.refresh()
    try:
        yield w
    finally:
        await w.stop()


async def transact(
    world: SandboxWorld,
    provider: str,
    messages: list[tuple[str, str, bytes]],
    *,
    source: str = "127.0.0.10",
    tls: bool = True,
) -> list[str]:
    """Send (mail_from, rcpt, data) in one session from source; every final reply, in order.
    Stops at a reply that closed the session."""
    address, port = world.mx_address(provider)
    client = aiosmtplib.SMTP(
        hostname=address,
        port=port,
        source_address=(source, 0),
        local_hostname=SOURCES.get(source, "mta.axiom.test"),
        start_tls=False,
        timeout=10,
    )
    await client.connect()
    if tls:
        await client.starttls(validate_certs=False)
    replies = []
    try:
        for mail_from, rcpt, data in messages:
            try:
                await client.mail(mail_from)
                await client.rcpt(rcpt)
                response = await client.data(data)
                replies.append(f"{response.code} {response.message}")
            except aiosmtplib.SMTPResponseException as exc:
                replies.append(f"{exc.code} {exc.message}")
                if exc.code == 421 or not client.is_connected:
                    break
                await client.rset()
            except aiosmtplib.SMTPServerDisconnected:
                replies.append("disconnected")
                break
    finally:
        client.close()
    return replies


def existing(provider: str, n: int) -> str:
    """The n-th address at provider that has a mailbox (unknown ones are a hashed share)."""
    p = behaviour().provider(provider)
    found = (f"ann{k}@{p.domains[0]}" for k in range(n * 2 + 100))
    return [a for a in found if mailbox_exists(a, p.unknown_mailbox_share)][n]


def one(provider: str, n: int = 0, **kw) -> list[tuple[str, str, bytes]]:
    rcpt = kw.pop("rcpt", None) or existing(provider, n)
    return [(kw.pop("mail_from", f"shop@{DOMAIN}"), rcpt, message(rcpt, n, **kw))]


# ---------------------------------------------------------------- DNS over the wire
async def test_dns_answers_over_udp_truncates_big_answers_and_serves_them_over_tcp(world):
    host, port = world.dns_address
    big = "v=spf1 " + " ".join(f"ip4:192.0.2.{n}" for n in range(60)) + " -all"  # > 512 octets
    world.state.override(f"big.{DOMAIN}", "TXT", [big], "t")
    await world.refresh()
    query = dns.message.make_query(f"big.{DOMAIN}", "TXT", use_edns=False)
    udp = await asyncio.to_thread(dns.query.udp, query, host, port=port, timeout=2)
    assert udp.flags & dns.flags.TC and udp.flags & dns.flags.AA and not udp.answer
    tcp = await asyncio.to_thread(dns.query.tcp, query, host, port=port, timeout=2)
    [rrset] = tcp.answer
    assert b"".join(next(iter(rrset)).strings).decode() == big  # split in 255-octet strings
    # the relay's own resolver, pointed at the sandbox by setting, gets whole DKIM keys
    resolver = Resolver.at([(host, port)])
    expected = txt_record_value("rsa", keys()[0].public_value)
    assert (await resolver.txt(f"axrsa._domainkey.{DOMAIN}")).values == (expected,)
    assert (await resolver.txt(f"big.{DOMAIN}")).values == (big,)
    mx = await resolver.resolve_mx("gmail.com")
    assert mx.targets[0].host == "gmail-smtp-in.l.google.com"
    assert mx.targets[0].addresses == (world.addresses["google"],)


async def test_the_world_is_healthy_and_releases_its_ports_when_stopped(world, tmp_path):
    assert await world.healthy()
    info = world.state.world()
    assert info["mx"]["google"]["address"] == world.addresses["google"]
    await world.stop()
    assert not await world.healthy()
    assert world.state.world() == {}
    again = SandboxWorld(world.settings, source_ips=SOURCES)
    await again.start()
    try:
        assert await again.healthy()
    finally:
        await again.stop()


# ---------------------------------------------------------------- rate limits
@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ("google", "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail"),
        ("microsoft", "451 4.7.500 Server busy. Please try again later from [127.0.0.10]"),
        ("yahoo", "421 4.7.0 [TSS04] Messages from 127.0.0.10 temporarily deferred"),
        ("apple", "421 4.7.1 Messages to ann"),
        ("generic", "450 4.7.1 <ann"),
    ],
)
async def test_a_cold_ip_sending_too_fast_gets_the_providers_rate_limit_reply(
    world, provider, expected
):
    # A cold IP's day at once (the short-term bucket holds the day's allowance), then the
    # day's limit. The world's clock stands still here: the bucket's tokens come back at the
    # cold tier's rate, and on a loaded machine these deliveries take seconds.
    daily = behaviour().reputation.daily
    burst = int(daily.burst_share * daily.cold_allowance)
    now = time.time()
    world.reputation.clock = lambda: now
    messages = [m for n in range(burst + 2) for m in one(provider, n)]
    replies = []
    for k in range(0, len(messages), 10):  # sessions under Yahoo's 20 messages each
        replies += await transact(world, provider, messages[k : k + 10])
    assert all(r.startswith("250") for r in replies[:burst]), replies
    assert replies[burst].startswith(expected), replies[burst]
    # another IP is judged on its own
    assert (await transact(world, provider, one(provider, 99), source="127.0.0.11"))[0][:3] == (
        "250"
    )
    await world.flush()
    counts = world.state.verdict_counts()
    assert counts[(provider, "accepted")] == burst + 1
    assert counts[(provider, "rate_limited")] >= 1


async def test_sustained_abuse_ends_in_a_hard_block(world):
    model = behaviour().reputation
    world.reputation.set_score(["google"], "127.0.0.10", model.block_below + 3)
    for _ in range(5):  # keep pushing after every deferral, as a careless sender would
        await transact(world, "google", one("google"))
        world.reputation.standing("google", "127.0.0.10").tokens = 0
    replies = await transact(world, "google", one("google"))
    assert replies[0].startswith("550 5.7.1 Our system has detected an unusual rate"), replies
    assert "has been blocked" in replies[0]
    assert world.reputation.blocked("google", "127.0.0.10")


async def test_yahoo_closes_a_connection_after_twenty_messages(world):
    world.reputation.set_score(["yahoo"], "127.0.0.10", 90)
    messages = [m for n in range(21) for m in one("yahoo", n)]
    replies = await transact(world, "yahoo", messages)
    assert [r[:3] for r in replies[:20]] == ["250"] * 20
    assert replies[20] == "421 Max message per connection reached, closing transmission channel"


# ---------------------------------------------------------------- blocklists
async def test_a_listed_ip_gets_each_providers_blocklist_reply(world):
    world.state.list("zen.spamhaus.org", "127.0.0.10", "127.0.0.2", "test")
    await world.refresh()
    expected = {
        "microsoft": "550 5.7.1 Service unavailable, Client host [127.0.0.10] blocked using "
        "Spamhaus",
        "yahoo": "553 5.7.1 [BL21] Connections will not be accepted from 127.0.0.10",
        "apple": "550 5.7.1 Your email was rejected due to listing in Spamhaus SBL",
        "generic": "554 5.7.1 Service unavailable; Client host [127.0.0.10] blocked using "
        "zen.spamhaus.org; Listed by SBL",
    }
    for provider, prefix in expected.items():
        [reply] = await transact(world, provider, one(provider))
        assert reply.startswith(prefix), (provider, reply)
        # the unlisted neighbour is not affected
        [clean] = await transact(world, provider, one(provider, 1), source="127.0.0.11")
        assert clean.startswith("250"), (provider, clean)
    # Gmail consults no public DNSBL
    [gmail] = await transact(world, "google", one("google"))
    assert gmail.startswith("250 2.0.0 OK")
    world.state.unlist("zen.spamhaus.org", "127.0.0.10")
    await world.refresh()
    [after] = await transact(world, "microsoft", one("microsoft", 2))
    assert after.startswith("250")


async def test_a_listed_sender_domain_gets_the_dbl_reply(world):
    world.state.list("dbl.spamhaus.org", DOMAIN, "127.0.1.2", "test")
    await world.refresh()
    [reply] = await transact(world, "apple", one("apple"))
    assert reply.startswith("550 5.7.1 Your email was rejected due to having a domain present")


# ---------------------------------------------------------------- authentication
async def test_signed_mail_is_accepted_and_kept_with_its_authentication_results(world):
    [reply] = await transact(world, "google", one("google", rcpt="ann@gmail.com"))
    assert reply.startswith("250 2.0.0 OK")
    [stored] = world.mailboxes.messages("google")
    assert stored.recipient == "ann@gmail.com"
    results = str(stored.headers["Authentication-Results"])
    assert "dkim=pass header.d=acme.example header.s=axrsa" in results
    assert "dkim=pass header.d=acme.example header.s=axed" in results
    assert "spf=pass smtp.mailfrom=acme.example" in results
    assert "dmarc=pass" in results
    assert "with ESMTPS" in str(stored.headers["Received"])


async def test_a_bad_signature_without_spf_gets_the_authentication_reply(world):
    rcpt = "ann@gmail.com"
    tampered = message(rcpt).replace(b"has shipped", b"has SHIPPED")
    replies = await transact(world, "google", [("bounce@other.example", rcpt, tampered)])
    assert replies[0].startswith(
        "550 5.7.26 This mail has been blocked because the sender is unauthenticated."
    ), replies
    [yahoo] = await transact(world, "yahoo", [("bounce@other.example", "bo@yahoo.com", tampered)])
    assert yahoo.startswith("550 5.7.9 This mail has been blocked")
    [apple] = await transact(world, "apple", [("bounce@other.example", "cy@icloud.com", tampered)])
    assert apple.startswith("554 5.7.1 [HME1]")
    assert world.mailboxes.messages() == []


async def test_dmarc_reject_is_enforced(world):
    world.state.override(f"_dmarc.{DOMAIN}", "TXT", ["v=DMARC1; p=reject"], "t")
    world.state.override("other.example", "TXT", ["v=spf1 include:_spf.relay.axiom.test -all"], "t")
    await world.refresh()
    unsigned = message("ann@gmail.com", signed=False)
    # SPF passes for other.example, but it is not aligned with From: acme.example
    [reply] = await transact(world, "google", [("b@other.example", "ann@gmail.com", unsigned)])
    assert reply.startswith(
        "550 5.7.26 Unauthenticated email from acme.example is not accepted due to domain's "
        "DMARC policy"
    )
    [ms] = await transact(world, "microsoft", [("b@other.example", "bo@outlook.com", unsigned)])
    assert ms.startswith("550 5.7.509 Access denied, sending domain acme.example does not pass")


async def test_broken_dkim_is_refused_only_for_bulk_senders(world):
    other = generate_key("rsa", 2048)
    world.state.override(
        f"axrsa._domainkey.{DOMAIN}", "TXT", [txt_record_value("rsa", other.public_value)], "t"
    )
    world.state.override(f"axed._domainkey.{DOMAIN}", "TXT", [], "t")
    await world.refresh()
    [small] = await transact(world, "google", one("google"))
    assert small.startswith("250"), small  # SPF passes: enough for a small sender
    world.state.set_knob("bulk_domains", [DOMAIN])
    await world.refresh()
    expected = {
        "google": "550 5.7.30 Your email has been blocked because DKIM authentication didn't pass",
        "yahoo": "550 5.7.9 This mail has been blocked because the sender is unauthenticated. "
        "Yahoo requires all senders to authenticate with both SPF and DKIM.",
        "microsoft": "550 5.7.515 Access denied, sending domain acme.example does not meet",
        "apple": "550 5.7.1 [CS01] Message rejected due to local policy",
    }
    for provider, prefix in expected.items():
        world.reputation.set_score([provider], "127.0.0.10", 90)
        [reply] = await transact(world, provider, one(provider, 1))
        assert reply.startswith(prefix), (provider, reply)


async def test_gmail_requires_tls_and_a_forward_confirmed_ptr(world):
    [plain] = await transact(world, "google", one("google"), tls=False)
    assert plain.startswith("421 4.7.29")
    [no_ptr] = await transact(world, "google", one("google"), source="127.0.0.12")
    assert no_ptr.startswith("550 5.7.25 The IP address sending this message does not have a PTR")


# ---------------------------------------------------------------- mailboxes
async def test_unknown_mailboxes_are_refused_with_the_providers_text(world):
    share = behaviour().provider("google").unknown_mailbox_share
    hashed = next(
        f"u{n}@gmail.com" for n in range(10000) if not mailbox_exists(f"u{n}@gmail.com", share)
    )
    for rcpt in ("unknown-ann@gmail.com", hashed):
        [reply] = await transact(world, "google", one("google", rcpt=rcpt))
        assert reply.startswith("550 5.1.1 The email account that you tried to reach does not"), (
            rcpt,
            reply,
        )
    [yahoo] = await transact(world, "yahoo", one("yahoo", rcpt="unknown-bo@yahoo.com"))
    assert yahoo.startswith("554 delivery error: dd This user doesn't have a yahoo.com account")


# ---------------------------------------------------------------- complaints
class _FeedbackInbox:
    def __init__(self) -> None:
        self.received: list[tuple[str, str, list[str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server, session, envelope):
        peer = session.peer[0]
        self.received.append((peer, envelope.mail_from, envelope.rcpt_tos, envelope.content))
        self.arrived.set()
        return "250 2.0.0 Ok: report received"


async def test_complaints_come_back_as_arf_reports_from_providers_with_a_feedback_loop(world):
    inbox = _FeedbackInbox()
    host, port = world.settings.sandbox_feedback_smtp.split(":")
    server = await asyncio.get_running_loop().create_server(
        lambda: AiosmtpdSMTP(inbox), host, int(port)
    )
    try:
        world.state.set_knob("complaint_share", {"*": 1.0})
        await world.refresh()
        world.reputation.set_score(["yahoo", "google"], "127.0.0.10", 90)
        [yahoo] = await transact(world, "yahoo", one("yahoo", rcpt="ann@yahoo.com"))
        assert yahoo.startswith("250")
        async with asyncio.timeout(10):
            await inbox.arrived.wait()
        [(peer, mail_from, rcpts, data)] = inbox.received
        assert peer == world.addresses["yahoo"]  # sent from Yahoo's own address
        assert (mail_from, rcpts) == ("feedback@arf.mail.yahoo.com", ["fbl@relay.axiom.test"])
        report = message_from_bytes(data, policy=policy.default)
        assert report.get_param("report-type") == "feedback-report"
        assert b"Feedback-Type: abuse" in data and b"Source-IP: 127.0.0.10" in data
        assert b"Original-Rcpt-To: <ann@yahoo.com>" in data
        # Gmail's loop is aggregate only: the complaint counts, no report is sent
        [gmail] = await transact(world, "google", one("google", rcpt="cy@gmail.com"))
        assert gmail.startswith("250")
        await asyncio.sleep(1.5)
        assert len(inbox.received) == 1
        assert world.reputation.standing("google", "127.0.0.10").complaints == 1
        for _ in range(50):
            complaints = world.state.complaints()
            if complaints and complaints[0]["status"] != "pending":
                break
            await asyncio.sleep(0.1)
        [row] = complaints
        assert (row["provider"], row["status"], row["recipient"]) == (
            "yahoo",
            "sent",
            "ann@yahoo.com",
        )
        assert "report received" in row["reply"]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_report_the_relay_refuses_is_kept_and_its_reply_recorded(world):
    world.state.set_knob("complaint_share", {"microsoft": 1.0})
    await world.refresh()
    world.reputation.set_score(["microsoft"], "127.0.0.10", 90)
    [reply] = await transact(world, "microsoft", one("microsoft", rcpt="dee@outlook.com"))
    assert reply.startswith("250 2.6.0")
    for _ in range(50):  # nobody listens at the feedback address in this test
        rows = world.state.complaints()
        if rows and rows[0]["status"] != "pending":
            break
        await asyncio.sleep(0.1)
    [row] = rows
    assert row["status"] == "error" and "Connect" in row["reply"]
    data = await asyncio.to_thread(Path(row["path"]).read_bytes)
    kept = message_from_bytes(data, policy=policy.default)
    assert kept.get_content_type() == "multipart/report"
    assert kept.get_payload()[2].get_content_type() == "message/rfc822"  # JMRP: whole message


async def test_a_listing_bites_on_the_next_message_of_an_open_session(world):
    address, port = world.mx_address("microsoft")
    client = aiosmtplib.SMTP(
        hostname=address, port=port, source_address=("127.0.0.10", 0), start_tls=False, timeout=10
    )
    await client.connect()
    try:
        [(mail_from, rcpt, data)] = one("microsoft")
        await client.sendmail(mail_from, [rcpt], data)  # accepted
        world.state.list("zen.spamhaus.org", "127.0.0.10", "127.0.0.2", "test")
        await world.refresh()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail(mail_from, [rcpt], data)
        assert refused.value.code == 550 and "blocked using Spamhaus" in refused.value.message
    finally:
        client.close()
