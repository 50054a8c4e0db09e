"""The relay's inbound listener, through a running `axiom relay`: complaint reports and bounces
for mail it sent suppress the recipient (SQLite and PostgreSQL), nothing is relayed, and the
sandbox world's feedback loop reaches it end to end."""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from datetime import UTC, datetime

import pytest
from sqlmodel import Session, select

from models import AuditEntry, Message, Recipient, Suppression
from models.db import make_engine
from relay.delivery.dsn import FailedRecipient, build_dsn
from relay.delivery.return_path import Tagger
from sandbox.behaviour import behaviour
from sandbox.feedback import Complaint, build_arf
from sandbox.mailbox import mailbox_exists
from sandbox.state import StateStore
from tests.conftest import RelayProcess, Tenant, seed_tenant
from tests.integration.test_sandbox_cli import WorldProcess

pytestmark = pytest.mark.integration

FEEDBACK = "fbl@relay.axiom.test"
BOUNCES = "bounces@relay.axiom.test"
NO_VERIFY = ssl.create_default_context()
NO_VERIFY.check_hostname, NO_VERIFY.verify_mode = False, ssl.CERT_NONE


@pytest.fixture
def relay(axiom_home):
    """A relay that accepts and keeps mail (no delivery): what it sent stays in its spool."""
    proc = RelayProcess(axiom_home, {"AXIOM_DELIVERY_ENABLED": "false"}).start()
    yield proc
    proc.stop()


def submit(relay: RelayProcess, tenant: Tenant, rcpt: str, subject: str = "Offer") -> str:
    """Submit one message; its queue id."""
    with smtplib.SMTP(*relay.submission, timeout=10) as client:
        client.starttls(context=NO_VERIFY)
        client.login(tenant.username, tenant.password)
        client.mail(f"shop@{tenant.domain}")
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
        code, reply = client.data(
            f"From: Shop <shop@{tenant.domain}>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n"
            "Buy now.\r\n".encode()
        )
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def spooled(home, queue_id: str) -> bytes:
    """The message exactly as the relay sends it (with its Received header and signatures)."""
    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            return s.exec(select(Message.data).where(Message.id == queue_id)).one()
    finally:
        engine.dispose()


def rows(home, model, *where):
    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            return list(s.exec(select(model).where(*where).order_by(model.id)).all())
    finally:
        engine.dispose()


def yahoo_arf(original: bytes, rcpt: str, tenant: Tenant) -> bytes:
    loop = behaviour().provider("yahoo").feedback
    complaint = Complaint(
        provider="yahoo",
        mx_host="mta5.am0.yahoodns.net",
        mx_address="127.0.0.1",
        source_ip="127.0.0.1",
        mail_from=f"shop@{tenant.domain}",
        recipient=rcpt,
        message_id="",
        original=original,
        authentication=f"mta5.am0.yahoodns.net; dkim=pass header.d={tenant.domain}",
        arrival=datetime.now(UTC),
    )
    return build_arf(complaint, loop, FEEDBACK)


def bounce(original: bytes, rcpt: str, status: str, diagnostic: str, tenant: Tenant) -> bytes:
    now = datetime.now(UTC)
    return build_dsn(
        reporting_mta="mx.example.net",
        from_local_part="MAILER-DAEMON",
        original_sender=f"shop@{tenant.domain}",
        original=original,
        arrival=now,
        failures=[FailedRecipient(rcpt, status, diagnostic, "mx.example.net")],
        now=now,
    )


def return_path(home, queue_id: str, rcpt: str) -> str:
    """The tagged return path the relay's delivery used for rcpt of queue_id."""
    [recipient_id] = [
        r.id for r in rows(home, Recipient, Recipient.message_id == queue_id) if r.address == rcpt
    ]
    return f"bounces+{Tagger(home.secret).tag(queue_id, recipient_id)}@relay.axiom.test"


def send_report(relay: RelayProcess, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    """One report through the inbound listener, over STARTTLS as a provider's MTA would."""
    with smtplib.SMTP(*relay.inbound, timeout=10) as client:
        client.ehlo("mta5.am0.yahoodns.net")
        client.starttls(context=NO_VERIFY)
        client.ehlo("mta5.am0.yahoodns.net")
        code, reply = client.mail(sender)
        assert code == 250, reply
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
        code, reply = client.data(data)
    return code, reply.decode()


# ------------------------------------------------------------------ complaints
def test_a_complaint_report_suppresses_the_recipient_and_later_mail_to_it_is_refused(
    axiom_home, relay
):
    acme = seed_tenant(axiom_home, "acme", "acme.example")
    queue_id = submit(relay, acme, "ann@yahoo.com")
    report = yahoo_arf(spooled(axiom_home, queue_id), "ann@yahoo.com", acme)
    code, reply = send_report(relay, "feedback@arf.mail.yahoo.com", FEEDBACK, report)
    assert (code, reply) == (250, "2.0.0 Ok: complaint recorded, 1 recipient(s) suppressed")
    # committed before the 250: readable by anyone the moment the reply arrived
    [row] = rows(axiom_home, Suppression)
    assert (row.address, row.source, row.reason) == (
        "ann@yahoo.com",
        "complaint",
        "complaint (abuse) via yahoo",
    )
    [entry] = rows(axiom_home, AuditEntry, AuditEntry.action == "complaint.received")
    assert entry.subject == "recipient:ann@yahoo.com"
    assert entry.evidence["provider"] == "yahoo"
    assert entry.evidence["feedback_type"] == "abuse"
    assert entry.evidence["user_agent"] == "Yahoo!-Mail-Feedback/2.0"
    assert entry.evidence["queue_id"] == queue_id
    assert entry.evidence["report_from"] == "feedback@arf.mail.yahoo.com"
    audit = json.loads(axiom_home.cli("audit", "--json").stdout)
    assert {"suppression.add", "complaint.received"} <= {e["action"] for e in audit}
    assert "audit chain intact" in axiom_home.cli("audit", "--verify").stdout
    # the tenant's next message to the complainer is refused at submission
    with smtplib.SMTP(*relay.submission, timeout=10) as client:
        client.starttls(context=NO_VERIFY)
        client.login(acme.username, acme.password)
        client.mail("shop@acme.example")
        code, reply = client.rcpt("Ann@yahoo.com")
    assert code == 550 and b"is on your suppression list" in reply
    # a report about mail that never went through us is acknowledged and changes nothing
    stranger = yahoo_arf(
        b"From: x@elsewhere.example\r\nTo: bo@yahoo.com\r\nMessage-ID: <1@elsewhere.example>"
        b"\r\n\r\nhi\r\n",
        "bo@yahoo.com",
        acme,
    )
    code, reply = send_report(relay, "feedback@arf.mail.yahoo.com", FEEDBACK, stranger)
    assert (code, reply) == (
        250,
        "2.0.0 Ok: complaint recorded; it matches no message sent through us",
    )
    assert len(rows(axiom_home, Suppression)) == 1
    listed = json.loads(axiom_home.cli("complaints", "--json").stdout)
    assert [(c["provider"], c["recipients"], c["suppressed"], c["queue_id"]) for c in listed] == [
        ("yahoo", ["ann@yahoo.com"], ["ann@yahoo.com"], queue_id),
        ("yahoo", [], [], None),
    ]
    assert "2 shown" in axiom_home.cli("complaints").stdout


# ------------------------------------------------------------------ bounces
def test_an_asynchronous_hard_bounce_suppresses_and_a_soft_one_does_not(axiom_home, relay):
    acme = seed_tenant(axiom_home, "acme", "acme.example")
    first = submit(relay, acme, "bob@example.net")
    hard = bounce(
        spooled(axiom_home, first),
        "bob@example.net",
        "5.1.1",
        "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual "
        "mailbox table",
        acme,
    )
    code, reply = send_report(relay, "", return_path(axiom_home, first, "bob@example.net"), hard)
    assert (code, reply) == (250, "2.0.0 Ok: bounce recorded, 1 recipient(s) suppressed")
    [row] = rows(axiom_home, Suppression)
    assert (row.address, row.source) == ("bob@example.net", "bounce")
    assert row.reason.startswith("mailbox_unknown: smtp; 550 5.1.1")
    second = submit(relay, acme, "cy@example.net")
    soft = bounce(
        spooled(axiom_home, second), "cy@example.net", "4.2.2", "452 4.2.2 Mailbox full", acme
    )
    code, reply = send_report(relay, "", return_path(axiom_home, second, "cy@example.net"), soft)
    assert (code, reply) == (250, "2.0.0 Ok: bounce recorded, 0 recipient(s) suppressed")
    assert [r.address for r in rows(axiom_home, Suppression)] == ["bob@example.net"]
    entries = rows(axiom_home, AuditEntry, AuditEntry.action == "bounce.received")
    assert [(e.evidence["queue_id"], e.evidence["category"]) for e in entries] == [
        (first, "mailbox_unknown"),
        (second, "mailbox_full"),
    ]
    added = rows(axiom_home, AuditEntry, AuditEntry.action == "suppression.add")
    assert [(e.actor, e.subject) for e in added] == [("relay:inbound", "recipient:bob@example.net")]
    # a forged tag names no mailbox; a bounce to the bare address is recorded, changes nothing
    third = submit(relay, acme, "dan@example.net")
    forged = return_path(axiom_home, third, "dan@example.net").replace("-", "-1", 1)
    with smtplib.SMTP(*relay.inbound, timeout=10) as client:
        client.ehlo("mx.example.net")
        client.mail("")
        code, reply = client.rcpt(forged)
    assert (code, reply) == (550, f"5.1.1 <{forged}>: no such mailbox here".encode())
    hard = bounce(spooled(axiom_home, third), "dan@example.net", "5.1.1", "550 5.1.1 no", acme)
    code, reply = send_report(relay, "", BOUNCES, hard)
    assert (code, reply) == (250, "2.0.0 Ok: bounce recorded, 0 recipient(s) suppressed")
    assert [r.address for r in rows(axiom_home, Suppression)] == ["bob@example.net"]


# ------------------------------------------------------------------ what it refuses
def test_the_inbound_listener_relays_nothing_and_takes_only_reports(axiom_home, relay):
    acme = seed_tenant(axiom_home, "acme", "acme.example")
    with smtplib.SMTP(*relay.inbound, timeout=10) as client:
        code, greeting = client.ehlo("mx.example")
        assert code == 250 and greeting.startswith(b"relay.axiom.test")
        assert client.has_extn("starttls") and client.has_extn("size")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGFjbWUtYXBwAHg=")[0] == 504
        assert client.mail("spammer@example.org")[0] == 250
        code, reply = client.rcpt("victim@gmail.com")
        assert (code, reply) == (550, b"5.7.1 Relay access denied")
        code, reply = client.rcpt("postmaster@relay.axiom.test")
        assert (code, reply) == (550, b"5.1.1 <postmaster@relay.axiom.test>: no such mailbox here")
        code, reply = client.rcpt("victim%gmail.com@relay.axiom.test")
        assert code == 550
        code, reply = client.docmd("RCPT", "TO:<@relay.axiom.test:victim@gmail.com>")
        assert code == 501  # a source route is refused, not silently dropped
        # plain mail to the feedback address: not a report, refused, nothing recorded
        assert client.rcpt(FEEDBACK)[0] == 250
        code, reply = client.data(b"From: x@example.org\r\nSubject: hi\r\n\r\nBuy pills\r\n")
        assert code == 550 and reply.startswith(b"5.7.1 Not a report")
        # the SIZE the listener announced is enforced
        limit = int(client.esmtp_features["size"])
        code, reply = client.mail("x@example.org", [f"SIZE={limit + 1}"])
        assert (code, reply[:5]) == (552, b"5.3.4")
        # the submission server's DATA screening applies: bare LF refused
        client.mail("x@example.org")
        client.rcpt(FEEDBACK)
        code, reply = client.data(b"From: x@example.org\nSubject: smuggled\n\nhi\n.\n")
    assert code == 550 and reply.startswith(b"5.6.0 Bare CR or LF")
    # a real report from the null sender on a plaintext session is taken
    queue_id = submit(relay, acme, "dee@example.net")
    hard = bounce(spooled(axiom_home, queue_id), "dee@example.net", "5.1.1", "550 5.1.1 no", acme)
    with smtplib.SMTP(*relay.inbound, timeout=10) as client:
        client.sendmail("", [return_path(axiom_home, queue_id, "dee@example.net")], hard)
    assert [r.address for r in rows(axiom_home, Suppression)] == ["dee@example.net"]
    assert not rows(axiom_home, AuditEntry, AuditEntry.action.startswith("complaint"))


# ------------------------------------------------------------------ the sandbox, end to end
def test_a_complaint_at_the_simulated_yahoo_comes_back_and_suppresses_the_recipient(axiom_home):
    acme = seed_tenant(axiom_home, "acme", "acme.example")
    world = WorldProcess(axiom_home).start()  # reads the tenant's DKIM keys for its DNS
    relay = RelayProcess(
        axiom_home,
        {
            "AXIOM_DELIVERY_PORT": world.env["AXIOM_DELIVERY_PORT"],
            "AXIOM_DNS_NAMESERVERS": world.env["AXIOM_SANDBOX_DNS_LISTEN"],
        },
    ).start()
    try:
        world.cli("reputation", "127.0.0.1", "--score", "90", "--provider", "yahoo")
        StateStore.for_home(axiom_home.path).set_knob("complaint_share", {"yahoo": 1.0})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads(world.cli("status", "--json").stdout)
            if status["knobs"].get("complaint_share") == {"yahoo": 1.0}:
                break
            time.sleep(0.2)
        share = behaviour().provider("yahoo").unknown_mailbox_share
        rcpt = next(
            f"fan{n}@yahoo.com" for n in range(100) if mailbox_exists(f"fan{n}@yahoo.com", share)
        )
        queue_id = submit(relay, acme, rcpt)
        deadline = time.monotonic() + 60
        found = []
        while time.monotonic() < deadline and not found:
            found = rows(axiom_home, Suppression, Suppression.address == rcpt)
            time.sleep(0.2)
        state = StateStore.for_home(axiom_home.path)
        assert found, (state.complaints(), relay.log.read_text()[-2000:])
    finally:
        relay.stop()
        world.stop()
    [row] = found
    assert (row.source, row.reason) == ("complaint", "complaint (abuse) via yahoo")
    [entry] = rows(axiom_home, AuditEntry, AuditEntry.action == "complaint.received")
    assert entry.evidence["provider"] == "yahoo"
    assert entry.evidence["reporting_mta"] == behaviour().provider("yahoo").mx[0][1]
    # its Original-Mail-From is the return path the relay used: its tag names the message
    assert (entry.evidence["queue_id"], entry.evidence["matched_by"]) == (
        queue_id,
        "return-path tag",
    )
    # the world sent it to the relay's inbound listener, which acknowledged it
    [complaint] = state.complaints()
    assert (complaint["provider"], complaint["status"], complaint["recipient"]) == (
        "yahoo",
        "sent",
        rcpt,
    )
    assert "Ok: complaint recorded, 1 recipient(s) suppressed" in complaint["reply"]
