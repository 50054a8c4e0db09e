"""Inbox placement in a running world: the simulated providers answer 250 either way and file the
mail in the inbox or the spam folder by the IP's and the domain's standing, their complaint rates
and authentication; the decision is in the stored copy and the state file, never in a reply.
Then the scenario report, through a real relay, splits what it delivered into inbox and spam."""

from __future__ import annotations

import json
from functools import cache

import aiosmtplib
import pytest

from relay.submission.dkim import generate_key, load_signing_key, sign, txt_record_value
from runbooks.loader import dkim_signing
from sandbox.behaviour import behaviour
from sandbox.mailbox import mailbox_exists
from sandbox.placement import summary
from sandbox.testing import free_dns_port, world_settings
from sandbox.world import SandboxWorld
from tests.conftest import RelayProcess, seed_tenant
from tests.integration.test_sandbox_cli import WorldProcess
from tests.patching import patched

pytestmark = pytest.mark.integration

SOURCES = {"127.0.0.10": "mta10.axiom.test", "127.0.0.11": "mta11.axiom.test"}
ACME, BETA = "acme.example", "beta.example"


@cache
def key():
    return generate_key("rsa", 2048)


def message(
    rcpt: str, n: int, domain: str = ACME, *, tamper: bool = False, signed: bool = True
) -> bytes:
    data = (
        f"From: Shop <shop@{domain}>\r\nTo: <{rcpt}>\r\nSubject: Order {n}\r\n"
        f"Message-ID: <{n}.{rcpt}@{domain}>\r\nDate: Thu, 26 Nov 2026 09:00:00 +0000\r\n\r\n"
        f"Your order {n} has shipped.\r\n"
    ).encode()
    if signed:
        signing = [load_signing_key(domain, "axrsa", "rsa", key().private_material)]
        with patched("dkimpy"):  # signed as the relay signs; verified by dkimpy as published
            data = sign(data, signing, dkim_signing().spec) + data
    return data.replace(b"has shipped", b"has SHIPPED") if tamper else data


def existing(provider: str, count: int, prefix: str = "ann") -> list[str]:
    p = behaviour().provider(provider)
    found = (f"{prefix}{k}@{p.domains[0]}" for k in range(count * 2 + 100))
    return [a for a in found if mailbox_exists(a, p.unknown_mailbox_share)][:count]


@pytest.fixture
async def world(tmp_path):
    settings = world_settings(
        tmp_path / "home",
        sandbox_feedback_smtp=f"127.0.0.1:{free_dns_port()}",  # nobody listens: reports fail
        sandbox_feedback_address="fbl@relay.axiom.test",
    )
    w = SandboxWorld(settings, source_ips=SOURCES)
    await w.start()
    for domain in (ACME, BETA):  # the customer's DNS, as `axiom domain records` asks
        w.state.override(
            f"axrsa._domainkey.{domain}", "TXT", [txt_record_value("rsa", key().public_value)], "t"
        )
        w.state.override(domain, "TXT", ["v=spf1 include:_spf.relay.axiom.test ~all"], "t")
        w.state.override(f"_dmarc.{domain}", "TXT", ["v=DMARC1; p=none"], "t")
    # another domain whose SPF passes for our IPs but is not aligned with From: acme.example
    w.state.override("other.example", "TXT", ["v=spf1 include:_spf.relay.axiom.test -all"], "t")
    await w.refresh()
    for ip in SOURCES:  # established everywhere: reputation is not what these tests judge
        w.reputation.set_score([p.name for p in behaviour().providers], ip, 90)
    try:
        yield w
    finally:
        await w.stop()


async def send(world, provider: str, items: list[tuple[str, str, bytes]], source="127.0.0.10"):
    """(mail_from, rcpt, data) in sessions of 10 (Yahoo closes after 20); every reply."""
    address, port = world.mx_address(provider)
    replies = []
    for k in range(0, len(items), 10):
        client = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            source_address=(source, 0),
            local_hostname=SOURCES[source],
            start_tls=False,
            timeout=10,
        )
        await client.connect()
        await client.starttls(validate_certs=False)
        try:
            for mail_from, rcpt, data in items[k : k + 10]:
                try:
                    await client.mail(mail_from)
                    await client.rcpt(rcpt)
                    response = await client.data(data)
                    replies.append(f"{response.code} {response.message}")
                except aiosmtplib.SMTPResponseException as exc:
                    replies.append(f"{exc.code} {exc.message}")
                    await client.rset()
        finally:
            client.close()
    return replies


def folder_of(world, provider: str, rcpt: str) -> str:
    [stored] = [m for m in world.mailboxes.messages(provider) if m.recipient == rcpt]
    return stored.folder


async def test_good_mail_goes_to_the_inbox_and_broken_dkim_under_quarantine_to_spam(world):
    [ann, bo, cy] = existing("google", 3)
    [good] = await send(world, "google", [(f"shop@{ACME}", ann, message(ann, 1))])
    # DMARC p=quarantine; the signature is broken and SPF passes for an unaligned domain
    world.state.override(f"_dmarc.{ACME}", "TXT", ["v=DMARC1; p=quarantine"], "t")
    await world.refresh()
    [quarantined] = await send(
        world, "google", [("b@other.example", bo, message(bo, 2, tamper=True))]
    )
    # the relay's view: the same 250 (only the provider's queue reference differs)
    assert good.startswith("250 2.0.0 OK ") and good.endswith(" - gsmtp"), good
    assert quarantined.startswith("250 2.0.0 OK ") and quarantined.endswith(" - gsmtp")
    assert len(good) == len(quarantined)
    assert folder_of(world, "google", ann) == "inbox"
    assert folder_of(world, "google", bo) == "spam"
    root = world.mailboxes.root
    stored = sorted(p.relative_to(root).parent.as_posix() for p in root.glob("google/**/*.eml"))
    assert stored == ["google", "google/spam"]
    [spam] = world.mailboxes.messages("google", folder="spam")
    assert str(spam.headers["X-Sandbox-Folder"]) == ("spam; rule=dmarc-quarantine; spam-share=1")
    assert "dkim=fail" in str(spam.headers["Authentication-Results"])
    # as a bulk sender the same mail is refused outright (Gmail 5.7.30), and not filed
    world.state.set_knob("bulk_domains", [ACME])
    await world.refresh()
    [refused] = await send(world, "google", [(f"shop@{ACME}", cy, message(cy, 3, tamper=True))])
    assert refused.startswith("550 5.7.30"), refused
    await world.flush()
    assert world.state.placement_counts() == {("google", "inbox"): 1, ("google", "spam"): 1}
    assert summary(world.settings.home)["google"] == {"inbox": 1, "spam": 1}
    [daily] = world.state.placement_daily()
    assert (daily["ip"], daily["from_domain"], daily["inbox"], daily["spam"]) == (
        "127.0.0.10",
        ACME,
        1,
        1,
    )


async def test_outlook_files_unauthenticated_mail_in_junk(world):
    [dee] = existing("microsoft", 1)
    world.state.override("other.example", "TXT", ["v=spf1 -all"], "t")  # SPF fails
    await world.refresh()
    unsigned = message(dee, 4, signed=False)
    [reply] = await send(world, "microsoft", [("b@other.example", dee, unsigned)])
    assert reply.startswith("250 2.6.0 ") and "Queued mail for delivery" in reply, reply
    [junk] = world.mailboxes.messages("microsoft", folder="spam")
    assert "rule=microsoft-unauthenticated-junk" in str(junk.headers["X-Sandbox-Folder"])


async def test_an_ip_over_yahoos_complaint_line_goes_to_spam(world):
    rcpts = existing("yahoo", 24)
    # 20 delivered to the inbox from 127.0.0.10, the first 2 reported as spam: 10 %
    world.state.set_knob("complaint_share", {"yahoo": 1.0})
    await world.refresh()
    first = await send(
        world, "yahoo", [(f"shop@{ACME}", r, message(r, n)) for n, r in enumerate(rcpts[:2])]
    )
    world.state.set_knob("complaint_share", {"yahoo": 0.0})
    await world.refresh()
    rest = await send(
        world, "yahoo", [(f"shop@{ACME}", r, message(r, n)) for n, r in enumerate(rcpts[2:20], 2)]
    )
    assert all(r.startswith("250 ok dirdel") for r in first + rest), first + rest
    assert world.reputation.inbox_complaints("yahoo", "127.0.0.10") == (20, 2)
    assert all(folder_of(world, "yahoo", r) == "inbox" for r in rcpts[:20])
    # the IP's next message goes to spam; the domain's from another IP still reaches the inbox
    # (a domain's rate counts from 200 inbox messages over all its IPs), and so does another
    # domain's
    [a, b, c] = rcpts[20:23]
    for source, domain, rcpt, n in [
        ("127.0.0.10", ACME, a, 20),
        ("127.0.0.11", ACME, b, 21),
        ("127.0.0.11", BETA, c, 22),
    ]:
        [reply] = await send(
            world, "yahoo", [(f"shop@{domain}", rcpt, message(rcpt, n, domain))], source=source
        )
        assert reply.startswith("250 ok dirdel"), (source, domain, reply)
    folders = {
        m.recipient: str(m.headers["X-Sandbox-Folder"]) for m in world.mailboxes.messages("yahoo")
    }
    assert folders[a].startswith("spam; rule=yahoo-ip-spam-rate-limit"), folders[a]
    assert folders[b] == "inbox", folders[b]
    assert folders[c] == "inbox"
    await world.flush()
    assert summary(world.settings.home, ip="127.0.0.11")["yahoo"] == {"inbox": 2, "spam": 0}
    assert summary(world.settings.home, from_domain=ACME)["yahoo"] == {"inbox": 21, "spam": 1}
    # what the state file keeps of the domain's standing (status shows it)
    assert {(r.provider, r.ip) for r in world.state.standings(domains=True)} >= {
        ("yahoo", ACME),
        ("yahoo", BETA),
    }


# ---------------------------------------------------------------- the scenario report
@pytest.fixture
def stack(axiom_home):
    """The world as its own process, a relay delivering into it, a demo tenant, up.json."""
    world = WorldProcess(axiom_home).start()
    relay = RelayProcess(
        axiom_home,
        {
            "AXIOM_DELIVERY_PORT": world.env["AXIOM_DELIVERY_PORT"],
            "AXIOM_DNS_NAMESERVERS": world.env["AXIOM_SANDBOX_DNS_LISTEN"],
        },
    ).start()
    demo = seed_tenant(axiom_home, "demo", "demo.axiom.test")
    (axiom_home.path / "up.json").write_text(
        json.dumps(
            {
                "submission": f"127.0.0.1:{axiom_home.ports['submission']}",
                "username": demo.username,
                "password": demo.password,
                "domain": demo.domain,
            }
        )
    )
    try:
        yield world
    finally:
        relay.stop()
        world.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_scenario_report_splits_delivered_mail_into_inbox_and_spam(stack):
    def scenario(*args: str) -> dict:
        out = stack.cli("scenario", *args, "--timeout", "60", "--json").stdout
        return {p["provider"]: p for p in json.loads(out)["providers"]}

    clean = scenario("cold-ip-campaign", "--count", "8")
    quarantined = scenario("dmarc-quarantine", "--count", "8")
    for provider in ("google", "yahoo", "microsoft", "apple"):
        # a cold IP's first mail, authenticated: delivered, to the inbox
        assert clean[provider]["delivered"] == clean[provider]["inbox"] == 2, clean[provider]
        assert clean[provider]["spam"] == 0
        # broken DKIM under p=quarantine: the relay counts it delivered, all of it is spam
        q = quarantined[provider]
        assert (q["delivered"], q["inbox"], q["spam"], q["refused"]) == (2, 0, 2, 0), q
    # the function a later experiment calls, on the running world's state file
    counted = summary(stack.home.path)
    for provider in ("google", "yahoo", "microsoft", "apple"):
        assert counted[provider] == {"inbox": 2, "spam": 2}, counted
    shown = " ".join(stack.cli("placement").stdout.split())
    assert "Where the providers filed the mail they accepted" in shown, shown
    assert "google │ 2 │ 2 │ 50%" in shown and "axiom.test" in shown, shown
    status = json.loads(stack.cli("status", "--json").stdout)
    assert status["placement"]["google"] == {"inbox": 2, "spam": 2}
    assert status["overrides"] == []  # the scenario's DNS steering was undone
