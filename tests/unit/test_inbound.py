"""The inbound path's parts: reading reports, recording them (SQLite and PostgreSQL), the
RCPT policy of the listener, and the settings that wire it in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import insert, select

from axiom.up import child_env
from config.settings import ConfigError, load_settings
from models import AuditEntry, Message, Recipient, Suppression
from models.audit_trail import verify
from protocol import tenants
from relay.delivery.dsn import FailedRecipient, build_dsn
from relay.delivery.return_path import Tag, Tagger
from relay.inbound.feedback import Arrival, Recording
from relay.inbound.feedback import record_report as record
from relay.inbound.listener import InboundContext, InboundHandler, Mailbox, ReturnPathDomains
from relay.inbound.reports import Bounce, Complaint, parse_report
from relay.metrics import build_inbound_metrics
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows
from relay.submission import replies
from sandbox.behaviour import behaviour
from sandbox.feedback import Complaint as SandboxComplaint
from sandbox.feedback import build_arf

HOST = "relay.axiom.test"
NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
YAHOO = Arrival(mail_from="feedback@arf.mail.yahoo.com", client_ip="127.0.25.3")
NULL = Arrival(mail_from="", client_ip="192.0.2.7")
TAGGER = Tagger(b"a test secret")
RECORDING = Recording(HOST, TAGGER)


def record_report(engine, report, arrival, now):
    return record(engine, report, arrival, now, RECORDING)


def tagged(queue_id: str) -> Arrival:
    """A bounce that came back to the message's verified return path (the message's tag)."""
    return Arrival(mail_from="", client_ip="192.0.2.7", tags=(Tag(queue_id, None),))


def sent_message(queue_id: str, rcpts: str, message_id: str | None = None) -> bytes:
    """A message as the submission server spools it: our Received header with the queue id."""
    message_id = message_id or f"<{queue_id}@acme.example>"
    return (
        f"Received: from app ([127.0.0.1])\r\n\tby {HOST} (Axiom Send) with ESMTPSA id "
        f"{queue_id};\r\n\tThu, 26 Nov 2026 09:00:00 +0000\r\n"
        f"From: Shop <shop@acme.example>\r\nTo: {rcpts}\r\nSubject: Offer\r\n"
        f"Message-ID: {message_id}\r\n\r\nBuy now.\r\n"
    ).encode()


def arf(
    original: bytes,
    recipient: str | None = "ann@yahoo.com",
    provider: str = "yahoo",
    feedback_type: str = "abuse",
) -> bytes:
    """An ARF report as the simulated provider's feedback loop builds it."""
    complaint = SandboxComplaint(
        provider=provider,
        mx_host=behaviour().provider(provider).mx[0][1],
        mx_address="127.0.25.3",
        source_ip="127.0.0.10",
        mail_from="shop@acme.example",
        recipient=recipient or "",
        message_id="",
        original=original,
        authentication=f"{provider}; dkim=pass header.d=acme.example",
        arrival=NOW,
    )
    data = build_arf(complaint, behaviour().provider(provider).feedback, f"fbl@{HOST}", NOW)
    if recipient is None:  # a loop that redacts the complaining address
        data = data.replace(b"Original-Rcpt-To: <>\r\n", b"")
    return data.replace(b"Feedback-Type: abuse", f"Feedback-Type: {feedback_type}".encode())


def dsn(original: bytes, rcpt: str, status: str, diagnostic: str) -> bytes:
    return build_dsn(
        reporting_mta="mx.example.net",
        from_local_part="MAILER-DAEMON",
        original_sender="shop@acme.example",
        original=original,
        arrival=NOW,
        failures=[FailedRecipient(rcpt, status, diagnostic, "mx.example.net")],
        now=NOW,
    )


# ------------------------------------------------------------------ reading reports
@pytest.mark.parametrize("provider", ["yahoo", "microsoft", "generic"])
def test_an_arf_report_is_read_with_the_original_it_quotes(provider):
    queue_id = new_queue_id()
    report = parse_report(arf(sent_message(queue_id, "ann@yahoo.com"), provider=provider))
    assert isinstance(report, Complaint)
    assert report.feedback_type == "abuse"
    assert report.user_agent == behaviour().provider(provider).feedback.user_agent
    assert report.reporting_mta == behaviour().provider(provider).mx[0][1]
    assert report.source_ip == "127.0.0.10"
    assert report.original_mail_from == "shop@acme.example"
    assert report.original_rcpt_to == ("ann@yahoo.com",)
    assert report.reported_domains == ("acme.example",)
    # Yahoo quotes the headers only, Microsoft and the generic loop the whole message
    assert report.original.queue_ids == (queue_id,)
    assert report.original.message_id == f"<{queue_id}@acme.example>"
    assert report.original.from_domain == "acme.example"
    assert report.original.to == ("ann@yahoo.com",)


def test_a_dsn_is_read_per_recipient():
    queue_id = new_queue_id()
    data = dsn(
        sent_message(queue_id, "Bob@Example.net"), "Bob@Example.net", "5.1.1", "550 5.1.1 no"
    )
    report = parse_report(data)
    assert isinstance(report, Bounce)
    assert report.reporting_mta == "mx.example.net"
    [status] = report.recipients
    assert (status.recipient, status.action, status.status) == (
        "bob@example.net",
        "failed",
        "5.1.1",
    )
    assert status.diagnostic == "smtp; 550 5.1.1 no"
    assert status.remote_mta == "mx.example.net"
    assert report.original.queue_ids == (queue_id,)


@pytest.mark.parametrize(
    "data",
    [
        b"From: a@b.example\r\nSubject: hello\r\n\r\nJust mail.\r\n",
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification;"
        b' boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nread\r\n--b--\r\n',
        # says feedback-report but carries no machine-readable part
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report;"
        b' boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nspam!\r\n--b--\r\n',
        # a feedback-report part without its required Feedback-Type
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report;"
        b' boundary="b"\r\n\r\n--b\r\nContent-Type: message/feedback-report\r\n\r\n'
        b"User-Agent: x/1\r\nVersion: 1\r\n--b--\r\n",
        # a delivery-status part naming no recipient
        b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="b"\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n'
        b"Reporting-MTA: dns; mx.example\r\n\r\nAction: failed\r\nStatus: 5.1.1\r\n--b--\r\n",
        b"\x00\xff garbage",
    ],
)
def test_anything_else_is_not_a_report(data):
    assert parse_report(data) is None


# ------------------------------------------------------------------ recording them
@pytest.fixture
def acme(engine):
    """A tenant and a way to spool messages as if the relay had sent them."""
    from sqlmodel import Session

    with Session(engine) as s:
        tenant = tenants.add_tenant(s, "acme")
        other = tenants.add_tenant(s, "other")
        s.commit()
        ids = tenant.id, other.id

    def spool(rcpts: list[str], tenant_id: int = ids[0], message_id: str | None = None, age=0):
        queue_id = new_queue_id()
        data = sent_message(queue_id, ", ".join(rcpts), message_id)
        entry = SpoolEntry(
            queue_id,
            tenant_id,
            "transactional",
            "shop@acme.example",
            rcpts,
            "acme.example",
            message_id or f"<{queue_id}@acme.example>",
            data,
            "127.0.0.1",
            "acme-app",
            created_at=NOW - timedelta(minutes=age),
        )
        messages, rows = spool_rows([entry])
        with engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), rows)
        return queue_id, data

    spool.tenant_ids = ids
    return spool


def rows(engine, model, *where):
    from sqlmodel import Session

    with Session(engine) as s:
        return list(s.exec(select(model).where(*where).order_by(model.id)).scalars())


def test_a_complaint_suppresses_the_recipient_for_the_tenant_and_is_audited(engine, acme):
    queue_id, data = acme(["Ann@yahoo.com"])
    outcome = record_report(engine, parse_report(arf(data)), YAHOO, NOW)
    assert (outcome.kind, outcome.queue_id, outcome.suppressed) == (
        "complaint",
        queue_id,
        ("ann@yahoo.com",),
    )
    [row] = rows(engine, Suppression)
    assert (row.tenant_id, row.address, row.source) == (
        acme.tenant_ids[0],
        "ann@yahoo.com",
        "complaint",
    )
    assert row.reason == "complaint (abuse) via yahoo"
    [added] = rows(engine, AuditEntry, AuditEntry.action == "suppression.add")
    assert (added.actor, added.subject) == ("relay:inbound", "recipient:ann@yahoo.com")
    [received] = rows(engine, AuditEntry, AuditEntry.action == "complaint.received")
    assert received.subject == "recipient:ann@yahoo.com"
    evidence = received.evidence
    assert evidence["provider"] == "yahoo"
    assert evidence["user_agent"] == "Yahoo!-Mail-Feedback/2.0"
    assert evidence["reporting_mta"] == "mta5.am0.yahoodns.net"
    assert (evidence["matched"], evidence["matched_by"], evidence["queue_id"]) == (
        True,
        "received header",
        queue_id,
    )
    assert evidence["suppressed"] == ["ann@yahoo.com"]
    # the same report again: acknowledged and audited, the list unchanged
    again = record_report(engine, parse_report(arf(data)), YAHOO, NOW)
    assert again.matched and again.suppressed == ()
    assert len(rows(engine, Suppression)) == 1
    assert len(rows(engine, AuditEntry, AuditEntry.action == "complaint.received")) == 2
    from sqlmodel import Session

    with Session(engine) as s:
        assert verify(s)[1] is None  # the hash chain holds


def test_the_message_is_found_by_message_id_then_by_recipient_and_domain(engine, acme):
    _, mine = acme(["cy@yahoo.com"], message_id="<order-7@acme.example>")
    # a message of another tenant with the same Message-ID, to another recipient
    acme(["dee@yahoo.com"], tenant_id=acme.tenant_ids[1], message_id="<order-7@acme.example>")
    headers_only = mine.split(b"\r\n", 3)[3]  # our Received header stripped on the way
    outcome = record_report(engine, parse_report(arf(headers_only, "cy@yahoo.com")), YAHOO, NOW)
    assert outcome.suppressed == ("cy@yahoo.com",)
    [row] = rows(engine, Suppression)
    assert row.tenant_id == acme.tenant_ids[0]
    # neither our Received header nor a known Message-ID: the recipient and sending domain
    acme(["eve@yahoo.com"], age=10)
    newest, _ = acme(["eve@yahoo.com"])
    quoted = b"From: Shop <shop@acme.example>\r\nTo: eve@yahoo.com\r\nMessage-ID: <x@y>\r\n\r\n"
    outcome = record_report(engine, parse_report(arf(quoted, "eve@yahoo.com")), YAHOO, NOW)
    assert outcome.queue_id == newest and outcome.suppressed == ("eve@yahoo.com",)
    [entry] = rows(
        engine,
        AuditEntry,
        AuditEntry.subject == "recipient:eve@yahoo.com",
        AuditEntry.action == "complaint.received",
    )
    assert entry.evidence["matched_by"] == "recipient and sending domain"


def test_a_redacted_complaint_about_a_one_recipient_message_names_that_recipient(engine, acme):
    queue_id, data = acme(["fay@yahoo.com"])
    redacted = data.replace(b"To: fay@yahoo.com", b"To: redacted@yahoo.com")
    outcome = record_report(engine, parse_report(arf(redacted, recipient=None)), YAHOO, NOW)
    assert (outcome.queue_id, outcome.suppressed) == (queue_id, ("fay@yahoo.com",))


def test_reports_about_mail_we_did_not_send_change_no_list(engine, acme):
    _, data = acme(["gil@yahoo.com", "hal@yahoo.com"])
    # about our message, but the complaining address never received it (forged or wrong)
    forged = record_report(engine, parse_report(arf(data, "mallory@yahoo.com")), YAHOO, NOW)
    assert forged.matched and forged.suppressed == ()
    # about a message that never went through us
    stranger = sent_message(new_queue_id(), "ivy@yahoo.com").replace(
        b"acme.example", b"elsewhere.example"
    )
    unmatched = record_report(engine, parse_report(arf(stranger, "ivy@yahoo.com")), YAHOO, NOW)
    assert not unmatched.matched and unmatched.suppressed == ()
    assert rows(engine, Suppression) == []
    entries = rows(engine, AuditEntry, AuditEntry.action == "complaint.received")
    assert [e.evidence["matched"] for e in entries] == [True, False]
    assert entries[1].subject == "provider:yahoo"


def test_a_complaint_about_one_of_our_bounces_suppresses_nobody(engine, acme):
    from relay.delivery.dsn import dsn_entry

    _, data = acme(["pat@example.net"])
    failure = FailedRecipient("pat@example.net", "5.1.1", "550 5.1.1 unknown", "mx.example.net")
    notice = build_dsn(  # the DSN the relay itself sent to the customer
        reporting_mta=HOST,
        from_local_part="MAILER-DAEMON",
        original_sender="shop@acme.example",
        original=data,
        arrival=NOW,
        failures=[failure],
        now=NOW,
    )
    entry = dsn_entry(acme.tenant_ids[0], "shop@acme.example", notice, NOW, HOST)
    messages, recipients = spool_rows([entry])
    with engine.begin() as conn:
        conn.execute(insert(Message), messages)
        conn.execute(insert(Recipient), recipients)
    # the customer's mailbox provider reports our DSN as spam
    report = parse_report(arf(notice, "shop@acme.example"))
    outcome = record_report(engine, report, YAHOO, NOW)
    assert (outcome.matched, outcome.suppressed) == (False, ())
    assert rows(engine, Suppression) == []


def test_feedback_that_is_no_complaint_is_recorded_without_suppressing(engine, acme):
    _, data = acme(["jo@yahoo.com"])
    report = parse_report(arf(data, "jo@yahoo.com", feedback_type="not-spam"))
    assert record_report(engine, report, YAHOO, NOW).suppressed == ()
    assert rows(engine, Suppression) == []
    [entry] = rows(engine, AuditEntry, AuditEntry.action == "feedback.received")
    assert entry.evidence["feedback_type"] == "not-spam"


def test_an_asynchronous_hard_bounce_suppresses_and_a_soft_one_does_not(engine, acme):
    queue_id, data = acme(["kim@example.net", "lee@example.net"])
    hard = dsn(data, "kim@example.net", "5.1.1", "550 5.1.1 <kim@example.net>: User unknown")
    outcome = record_report(engine, parse_report(hard), tagged(queue_id), NOW)
    assert (outcome.kind, outcome.queue_id, outcome.suppressed) == (
        "bounce",
        queue_id,
        ("kim@example.net",),
    )
    [row] = rows(engine, Suppression)
    assert (row.address, row.source) == ("kim@example.net", "bounce")
    assert row.reason.startswith("mailbox_unknown: smtp; 550 5.1.1")
    soft = dsn(data, "lee@example.net", "4.2.2", "452 4.2.2 Mailbox full")
    assert record_report(engine, parse_report(soft), tagged(queue_id), NOW).suppressed == ()
    entries = rows(engine, AuditEntry, AuditEntry.action == "bounce.received")
    assert [(e.subject, e.evidence["category"], e.evidence["suppressed"]) for e in entries] == [
        ("recipient:kim@example.net", "mailbox_unknown", True),
        ("recipient:lee@example.net", "mailbox_full", False),
    ]
    assert len(rows(engine, Suppression)) == 1


def test_a_bounce_quoting_no_smtp_reply_is_classified_by_its_status(engine, acme):
    queue_id, data = acme(["max@example.net"])
    report = dsn(data, "max@example.net", "5.1.1", "x").replace(
        b"Diagnostic-Code: smtp; x", b'Diagnostic-Code: X-Postfix; unknown user: "max"'
    )
    outcome = record_report(engine, parse_report(report), tagged(queue_id), NOW)
    assert (outcome.queue_id, outcome.suppressed) == (queue_id, ("max@example.net",))
    [entry] = rows(engine, AuditEntry, AuditEntry.action == "bounce.received")
    assert (entry.evidence["category"], entry.evidence["status"]) == ("mailbox_unknown", "5.1.1")


def test_a_bounce_to_a_tagged_address_finds_the_message_by_its_tag(engine, acme):
    queue_id, _ = acme(["ned@example.net"])
    bare = b"From: x@y.example\r\nSubject: quoted nothing useful\r\n\r\n"
    data = dsn(bare, "ned@example.net", "5.1.1", "550 5.1.1 unknown")
    outcome = record_report(engine, parse_report(data), tagged(queue_id), NOW)
    assert (outcome.queue_id, outcome.suppressed) == (queue_id, ("ned@example.net",))
    # a bounce about a recipient the tagged message never had suppresses nobody
    other = dsn(bare, "oz@example.net", "5.1.1", "550 5.1.1 unknown")
    assert record_report(engine, parse_report(other), tagged(queue_id), NOW).suppressed == ()


def test_a_bounce_not_at_a_verified_return_path_changes_nothing(engine, acme):
    """Anyone can send a DSN quoting our Received header to the bare bounce address: it is
    audited with the message it seems to be about, and suppresses nobody."""
    queue_id, data = acme(["pia@example.net"])
    forged = dsn(data, "pia@example.net", "5.1.1", "550 5.1.1 <pia@example.net>: User unknown")
    outcome = record_report(engine, parse_report(forged), NULL, NOW)
    assert (outcome.queue_id, outcome.suppressed, outcome.acted) == (queue_id, (), False)
    assert rows(engine, Suppression) == []
    [entry] = rows(engine, AuditEntry, AuditEntry.action == "bounce.received")
    assert entry.evidence["matched_by"] == "received header"
    assert "cannot be told from a forged one" in entry.evidence["note"]
    [recipient] = rows(engine, Recipient, Recipient.message_id == queue_id)
    assert recipient.state == "queued"


# ------------------------------------------------------------------ the listener's policy
def handler() -> InboundHandler:
    return InboundHandler(
        InboundContext(
            engine=None,
            feedback=Mailbox.of(f"fbl@{HOST}"),
            bounces=Mailbox.of(f"bounces@{HOST}"),
            metrics=METRICS,
            recording=RECORDING,
            return_path_domains=ReturnPathDomains(lambda: {"bounces.acme.example"}),
            max_recipients=3,
        )
    )


QUEUE_ID = "01KB2Z8Y3M4N5P6Q7R8S9T0V1W"
GOOD_TAG = TAGGER.tag(QUEUE_ID, 42)


METRICS = build_inbound_metrics()


@pytest.mark.parametrize(
    ("address", "reply"),
    [
        (f"fbl@{HOST}", replies.RECIPIENT_OK),
        (f"FBL@{HOST.upper()}", replies.RECIPIENT_OK),
        (f"bounces@{HOST}", replies.RECIPIENT_OK),
        (f"bounces+{GOOD_TAG}@{HOST}", replies.RECIPIENT_OK),
        (f"Bounces+{GOOD_TAG.upper()}@{HOST}", replies.RECIPIENT_OK),  # case-folded on the way
        (f"bounces+{TAGGER.tag(QUEUE_ID)}@{HOST}", replies.RECIPIENT_OK),  # the message's tag
        (f"bounces+{GOOD_TAG}@bounces.acme.example", replies.RECIPIENT_OK),  # a customer's
        (f"bounces+{GOOD_TAG}@acme.example", replies.INBOUND_RELAY_DENIED),
        # a forged tag (the recipient id changed) or an old untagged form names no mailbox
        (
            f"bounces+{GOOD_TAG.replace('-42-', '-43-')}@{HOST}",
            replies.INBOUND_NO_MAILBOX.format(
                address=f"bounces+{GOOD_TAG.replace('-42-', '-43-')}@{HOST}"
            ),
        ),
        (
            f"bounces+{QUEUE_ID}@{HOST}",
            replies.INBOUND_NO_MAILBOX.format(address=f"bounces+{QUEUE_ID}@{HOST}"),
        ),
        ("someone@gmail.com", replies.INBOUND_RELAY_DENIED),
        (f"fbl@{HOST}.evil.example", replies.INBOUND_RELAY_DENIED),
        (f"postmaster@{HOST}", replies.INBOUND_NO_MAILBOX.format(address=f"postmaster@{HOST}")),
        (f"fbl+x@{HOST}", replies.INBOUND_NO_MAILBOX.format(address=f"fbl+x@{HOST}")),
        (
            f"someone%gmail.com@{HOST}",
            replies.INBOUND_NO_MAILBOX.format(address=f"someone%gmail.com@{HOST}"),
        ),
        ("no-at-sign", replies.BAD_ADDRESS),
    ],
)
async def test_only_our_own_mailboxes_are_recipients(address, reply):
    envelope = Envelope()
    answer = await handler().handle_RCPT(None, Session(None), envelope, address, [])
    assert answer == reply
    assert envelope.rcpt_tos == ([address] if reply == replies.RECIPIENT_OK else [])


async def test_anyone_may_send_reports_but_not_many_recipients_at_once():
    h, envelope = handler(), Envelope()
    assert await h.handle_MAIL(None, Session(None), envelope, "<>", []) == replies.SENDER_OK
    assert envelope.mail_from == "<>"
    for _ in range(3):
        assert await h.handle_RCPT(None, Session(None), envelope, f"fbl@{HOST}", []) == (
            replies.RECIPIENT_OK
        )
    assert await h.handle_RCPT(None, Session(None), envelope, f"fbl@{HOST}", []) == (
        replies.TOO_MANY_RECIPIENTS
    )
    assert await h.handle_MAIL(None, Session(None), Envelope(), "not an address", []) == (
        replies.BAD_SENDER_ADDRESS
    )


async def test_ehlo_offers_no_auth():
    session = Session(None)
    answer = await handler().handle_EHLO(
        None, session, Envelope(), "mx.example", ["250-relay", "250-AUTH ", "250 HELP"]
    )
    assert answer == ["250-relay", "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]
    assert session.host_name == "mx.example"


async def test_a_report_that_cannot_be_committed_is_not_acknowledged(tmp_path):
    from models.db import make_engine

    h = handler()
    h.ctx.engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")  # no tables: commit fails
    envelope = Envelope()
    envelope.mail_from = "feedback@arf.mail.yahoo.com"
    envelope.rcpt_tos = [f"fbl@{HOST}"]
    envelope.original_content = arf(sent_message(new_queue_id(), "ann@yahoo.com"))
    session = Session(None)
    session.peer = ("127.0.25.3", 40000)
    try:
        assert await h.handle_DATA(None, session, envelope) == replies.INBOUND_NOT_RECORDED
    finally:
        h.ctx.engine.dispose()
    envelope.original_content = b"From: a@b.example\r\n\r\nnot a report\r\n"
    assert await h.handle_DATA(None, session, envelope) == replies.INBOUND_NOT_A_REPORT


# ------------------------------------------------------------------ settings and wiring
def test_the_inbound_listener_is_on_by_default_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("AXIOM_CONFIG", str(tmp_path / "absent.toml"))
    s = load_settings(home=tmp_path)
    assert s.inbound_listen == "127.0.0.1:2527"
    assert (s.feedback_mailbox, s.bounce_mailbox) == (f"fbl@{HOST}", f"bounces@{HOST}")
    for off in ("", "off"):
        monkeypatch.setenv("AXIOM_INBOUND_LISTEN", off)
        assert load_settings(home=tmp_path).inbound_listen is None
    monkeypatch.setenv("AXIOM_INBOUND_LISTEN", "25")
    with pytest.raises(ConfigError, match="AXIOM_INBOUND_LISTEN: expected HOST:PORT"):
        load_settings(home=tmp_path)
    monkeypatch.delenv("AXIOM_INBOUND_LISTEN")
    monkeypatch.setenv("AXIOM_FEEDBACK_ADDRESS", "fbl at example")
    with pytest.raises(ConfigError, match="AXIOM_FEEDBACK_ADDRESS: expected one address"):
        load_settings(home=tmp_path)


def test_axiom_up_points_the_sandbox_feedback_loops_at_the_inbound_listener(monkeypatch, tmp_path):
    monkeypatch.setenv("AXIOM_CONFIG", str(tmp_path / "absent.toml"))
    for name in ("AXIOM_SANDBOX_FEEDBACK_SMTP", "AXIOM_SANDBOX_FEEDBACK_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    s = load_settings(
        home=tmp_path, inbound_listen="127.0.0.1:3527", feedback_address="loop@axiom.example"
    )
    env = child_env(s)
    assert env["AXIOM_SANDBOX_FEEDBACK_SMTP"] == "127.0.0.1:3527"
    assert env["AXIOM_SANDBOX_FEEDBACK_ADDRESS"] == "loop@axiom.example"
    assert "AXIOM_SANDBOX_FEEDBACK_SMTP" not in child_env(
        load_settings(home=tmp_path, inbound_listen="")
    )
