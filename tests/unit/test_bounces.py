"""Bounces come back to us (issue 13): the return path's tag, the domain it names, and real
bounces of many formats (tests/fixtures/bounces/) tied back to their message and recipient,
classified, suppressing on a hard bounce, turning the recipient bounced with a DSN to the
customer, and recorded as delivery events; ARF complaints as complaint events. SQLite and
PostgreSQL."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, update
from sqlmodel import Session

from config.settings import ConfigError, load_settings
from models import (
    AuditEntry,
    DeliveryEvent,
    Domain,
    Message,
    Recipient,
    RecipientState,
    Suppression,
)
from protocol import tenants
from relay.delivery.return_path import (
    MAC_LENGTH,
    ReturnPaths,
    Tag,
    Tagger,
    check_local_part,
    published_return_paths,
    return_path_domains,
)
from relay.inbound.feedback import Arrival, Recording, record_report
from relay.inbound.reports import Bounce, Complaint, parse_report
from relay.spool.claims import Claim, QueuedMessage
from relay.spool.writer import SpoolEntry, new_queue_id, spool_rows

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bounces"
HOST = "relay.axiom.test"
NOW = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
SECRET = b"the relay's secret key"
TAGGER = Tagger(SECRET)
RECORDING = Recording(HOST, TAGGER)


# ------------------------------------------------------------------ the tag
def test_a_tag_names_the_message_and_recipient_and_reads_back_case_insensitively():
    queue_id = new_queue_id()
    tag = TAGGER.tag(queue_id, 2_147_483_647)  # the largest recipient id PostgreSQL holds
    assert tag == tag.lower() and tag.startswith(queue_id.lower() + "-2147483647-")
    assert len(f"bounces+{tag}") <= 64 - (15 - len("bounces"))  # room for a 15-octet local
    assert TAGGER.verify(tag) == Tag(queue_id, 2_147_483_647)
    assert TAGGER.verify(tag.upper()) == Tag(queue_id, 2_147_483_647)
    message_tag = TAGGER.tag(queue_id)
    assert TAGGER.verify(message_tag) == Tag(queue_id, None)
    assert len(message_tag.rpartition("-")[2]) == MAC_LENGTH


def test_a_forged_or_altered_tag_is_not_ours():
    queue_id = new_queue_id()
    tag = TAGGER.tag(queue_id, 7)
    mac = tag.rpartition("-")[2]
    other = new_queue_id()
    for forged in (
        f"{queue_id.lower()}-8-{mac}",  # another recipient of the same message
        f"{other.lower()}-7-{mac}",  # another message
        f"{queue_id.lower()}-{mac}",  # the recipient's MAC as the message's
        tag[:-1] + ("a" if tag[-1] != "a" else "b"),
        queue_id,  # an untagged queue id, as before VERP
        "",
        "x" * 80,
    ):
        assert TAGGER.verify(forged) is None, forged
    assert Tagger(b"another secret").verify(tag) is None


def test_the_bounce_local_part_leaves_room_for_the_tag(monkeypatch, tmp_path):
    assert check_local_part("bounces") == "bounces"
    for bad in ("", "b" * 16, "a+b"):
        with pytest.raises(ValueError, match="local part"):
            check_local_part(bad)
    monkeypatch.setenv("AXIOM_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="AXIOM_BOUNCE_ADDRESS"):
        load_settings(home=tmp_path, bounce_address="return-path-bounces@x.example")
    assert load_settings(home=tmp_path, bounce_address="rp@x.example").bounce_mailbox == (
        "rp@x.example"
    )


# ------------------------------------------------------------------ the domain
@pytest.fixture
def acme(engine):
    """Tenant acme with its sending domain acme.example; spool(rcpts) spools a message as
    the relay sent it, each recipient delivered by 127.0.0.10 to the provider's MX."""
    with Session(engine) as s:
        tenant = tenants.add_tenant(s, "acme")
        s.commit()
        tenant_id = tenant.id
        s.add(Domain(tenant_id=tenant_id, name="acme.example"))
        s.commit()

    def spool(rcpts: list[str], *, message_id: str | None = None, delivered: bool = True):
        queue_id = new_queue_id()
        message_id = message_id or f"<{queue_id}@acme.example>"
        data = (
            f"Received: from app ([127.0.0.1])\r\n\tby {HOST} (Axiom Send) with ESMTPSA id "
            f"{queue_id};\r\n\tThu, 26 Nov 2026 09:00:00 +0000\r\n"
            f"From: Shop <shop@acme.example>\r\nTo: {', '.join(rcpts)}\r\nSubject: Offer\r\n"
            f"Message-ID: {message_id}\r\n\r\nBuy now.\r\n"
        ).encode()
        entry = SpoolEntry(
            queue_id,
            tenant_id,
            "marketing",
            "shop@acme.example",
            rcpts,
            "acme.example",
            message_id,
            data,
            "127.0.0.1",
            "acme-app",
            created_at=NOW - timedelta(hours=1),
        )
        messages, rows = spool_rows([entry])
        with engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), rows)
            ids = dict(
                conn.execute(
                    select(Recipient.address, Recipient.id).where(Recipient.message_id == queue_id)
                ).all()
            )
            if delivered:
                conn.execute(
                    update(Recipient)
                    .where(Recipient.message_id == queue_id)
                    .values(state=RecipientState.delivered, attempts=1)
                )
                for address, recipient_id in ids.items():
                    conn.execute(
                        insert(DeliveryEvent).values(
                            at=NOW - timedelta(minutes=50),
                            kind="attempt",
                            tenant_id=tenant_id,
                            stream="marketing",
                            from_domain="acme.example",
                            message_id=queue_id,
                            recipient_id=recipient_id,
                            recipient=address,
                            attempt=1,
                            source_ip="127.0.0.10",
                            provider="gmail",
                            mx_host="gmail-smtp-in.l.google.com",
                            reply_code=250,
                            category="delivered",
                        )
                    )
        return queue_id, {a.lower(): i for a, i in ids.items()}

    spool.tenant_id = tenant_id
    return spool


def rows(engine, model, *where):
    with Session(engine) as s:
        return list(s.exec(select(model).where(*where).order_by(model.id)).scalars())


def queued(queue_id: str, mail_from: str = "shop@acme.example") -> QueuedMessage:
    return QueuedMessage(queue_id, 1, "marketing", mail_from, b"", NOW, from_domain="acme.example")


def claim(recipient_id: int) -> Claim:
    return Claim(recipient_id, "q", "ann@gmail.com", "gmail.com", 0)


async def test_mail_from_is_the_relays_bounce_domain_until_the_customers_is_published(engine, acme):
    paths = ReturnPaths(engine, bounce_address=f"bounces@{HOST}", secret=SECRET, ttl=0)
    queue_id = new_queue_id()
    one = await paths.sender(queued(queue_id), [claim(41)])
    assert one == f"bounces+{TAGGER.tag(queue_id, 41)}@{HOST}"
    several = await paths.sender(queued(queue_id), [claim(41), claim(42)])
    assert several == f"bounces+{TAGGER.tag(queue_id)}@{HOST}"
    assert await paths.sender(queued(queue_id, mail_from=""), [claim(41)]) == ""  # our DSNs
    # the customer's subdomain is named, not yet published: still ours
    with Session(engine) as s:
        domain = s.exec(select(Domain)).scalars().one()
        domain.return_path_domain = "bounces.acme.example"
        s.add(domain)
        s.commit()
    assert (await paths.sender(queued(queue_id), [claim(41)])).endswith(f"@{HOST}")
    assert return_path_domains(engine) == {"bounces.acme.example"}  # the listener takes it
    assert published_return_paths(engine) == {}
    # published: the customer's, so that SPF aligns with the From domain
    with Session(engine) as s:
        domain = s.exec(select(Domain)).scalars().one()
        domain.return_path_published_at = NOW
        s.add(domain)
        s.commit()
    assert await paths.sender(queued(queue_id), [claim(41)]) == (
        f"bounces+{TAGGER.tag(queue_id, 41)}@bounces.acme.example"
    )
    other = QueuedMessage(queue_id, 1, "marketing", "x@other.example", b"", NOW, "other.example")
    assert (await paths.sender(other, [claim(41)])).endswith(f"@{HOST}")


async def test_the_published_domains_are_read_once_per_ttl(engine, acme):
    now = [0.0]
    paths = ReturnPaths(
        engine, bounce_address=f"bounces@{HOST}", secret=SECRET, ttl=30, clock=lambda: now[0]
    )
    assert (await paths.sender(queued(new_queue_id()), [claim(1)])).endswith(f"@{HOST}")
    with Session(engine) as s:
        domain = s.exec(select(Domain)).scalars().one()
        domain.return_path_domain, domain.return_path_published_at = "rp.acme.example", NOW
        s.add(domain)
        s.commit()
    now[0] = 29.0
    assert (await paths.sender(queued(new_queue_id()), [claim(1)])).endswith(f"@{HOST}")
    now[0] = 30.0
    assert (await paths.sender(queued(new_queue_id()), [claim(1)])).endswith("@rp.acme.example")


# ------------------------------------------------------------------ real bounces, tied back
# file, the addresses it names (none: only the tag names it), format, category, hard bounce
BOUNCES = [
    ("sisimai-lhost-postfix-02.eml", ["userunknown@example.co.jp"], "rfc3464", "mailbox_unknown"),
    (
        "sisimai-lhost-sendmail-01.eml",
        ["userunknown@bouncehammer.jp"],
        "rfc3464",
        "mailbox_unknown",
    ),
    ("sisimai-lhost-exchange2007-01.eml", ["mikeneko@example.co.jp"], "rfc3464", "mailbox_unknown"),
    ("sisimai-lhost-outlook-02.eml", ["kijitora@example.jp"], "rfc3464", "mailbox_unknown"),
    # SES calls it an "Unknown address error", but the receiver it quotes said "550 5.7.1 …
    # Access denied": a policy refusal, which classification 1.2 reads (it suppresses nobody).
    ("sisimai-lhost-amazonses-01.eml", ["shironeko@example.co.jp"], "rfc3464", "policy"),
    ("sisimai-lhost-courier-01.eml", ["kijitora@example.co.jp"], "rfc3464", "mailbox_unknown"),
    ("sisimai-rhost-google-01.eml", ["shironeko@example.ne.jp"], "rfc3464", "mailbox_disabled"),
    ("sisimai-lhost-exim-02.eml", ["kijitora@example.jp"], "text", "mailbox_unknown"),
    ("sisimai-lhost-qmail-01.eml", ["kijitora@example.ne.jp"], "text", "mailbox_unknown"),
    ("sisimai-lhost-yahoo-03.eml", ["kijitora@example.jp"], "text", "mailbox_unknown"),
    ("sisimai-lhost-gmail-01.eml", ["userunknown@example.jp"], "text", "mailbox_unknown"),
    ("sisimai-lhost-gmx-02.eml", ["shironeko@example.jp"], "text", "mailbox_unknown"),
    ("sisimai-lhost-mailru-02.eml", ["kijitora@example.jp"], "text", "mailbox_full"),
    ("sisimai-lhost-exchange2003-01.eml", ["kijitora@example.jp"], "text", "unknown"),
    ("flufl-exim_01.eml", ["userx@its.example.nl"], "text", "mailbox_unknown"),
    ("flufl-postfix_01.eml", ["xxxxx@local.ie"], "text", "mailbox_unknown"),
    ("flufl-qmail_01.eml", ["userx@example.de"], "text", "unknown"),
    ("flufl-yahoo_01.eml", ["userx@example.com"], "text", "transient"),
    ("flufl-microsoft_02.eml", ["userx@example.com"], "text", "unknown"),
    ("flufl-groupwise_01.eml", ["userx@example.edu"], "text", "unknown"),
    ("sisimai-lhost-office365-01.eml", [], "quoted-reply", "mailbox_unknown"),
    ("sisimai-lhost-yahoo-01.eml", [], "quoted-reply", "mailbox_unknown"),
    ("sisimai-lhost-opensmtpd-01.eml", [], "quoted-reply", "mailbox_unknown"),
]
HARD = {"mailbox_unknown", "bad_domain"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_every_fixture_is_listed_with_its_source():
    readme = (FIXTURES / "README.md").read_text()
    files = sorted(p.name for p in FIXTURES.glob("*.eml"))
    assert len(files) >= 20
    for name in files:
        assert f"| {name} |" in readme, name
    listed = {name for name, *_ in BOUNCES} | {name for name, *_ in COMPLAINTS}
    assert listed == set(files)


@pytest.mark.parametrize(("name", "named", "form", "category"), BOUNCES, ids=lambda v: str(v))
def test_a_real_bounce_is_tied_to_its_message_and_recipient(
    engine, acme, name, named, form, category
):
    recipient = named[0] if named else "ann@example.org"
    # a second recipient at another domain, delivered in its own transaction
    queue_id, ids = acme([recipient, "other@example.net"])
    report = parse_report(fixture(name), tagged=True)
    assert isinstance(report, Bounce) and report.format == form
    assert [s.recipient for s in report.recipients if s.recipient == recipient] == named[:1]
    arrival = Arrival("", "192.0.2.7", tags=(TAGGER.verify(TAGGER.tag(queue_id, ids[recipient])),))
    outcome = record_report(engine, report, arrival, NOW, RECORDING)
    assert outcome.queue_id == queue_id and outcome.acted
    # the delivery event: the message's tenant, stream and From domain, the delivery's path
    [event] = rows(engine, DeliveryEvent, DeliveryEvent.kind == "bounce")
    assert (event.message_id, event.recipient_id, event.recipient) == (
        queue_id,
        ids[recipient],
        recipient,
    )
    assert (event.tenant_id, event.stream, event.from_domain) == (
        acme.tenant_id,
        "marketing",
        "acme.example",
    )
    assert (event.source_ip, event.provider, event.mx_host) == (
        "127.0.0.10",
        "gmail",
        "gmail-smtp-in.l.google.com",
    )
    assert event.category == category and event.attempt is None
    failed = report.recipients[0].action == "failed"
    assert event.permanent == failed
    # suppressed on a hard bounce only, for the message's tenant
    suppressed = [s.address for s in rows(engine, Suppression)]
    assert suppressed == ([recipient] if category in HARD else [])
    assert outcome.suppressed == tuple(suppressed)
    # the recipient bounced and the customer got the DSN a refusal gives; the other recipient
    # of the message is untouched
    states = {r.address: r.state for r in rows(engine, Recipient, Recipient.message_id == queue_id)}
    assert states == {
        recipient: "bounced" if failed else "delivered",
        "other@example.net": "delivered",
    }
    [dsn] = rows(engine, Message, Message.mail_from == "")
    assert (dsn.tenant_id, dsn.stream) == (acme.tenant_id, "dsn")
    [to] = rows(engine, Recipient, Recipient.message_id == dsn.id)
    assert to.address == "shop@acme.example"
    notice = dsn.data.decode()
    assert f"Final-Recipient: rfc822; {recipient}" in notice
    assert "it was accepted, then returned by the receiving system" in notice
    assert f"Message-ID: <{queue_id}@acme.example>" in notice  # the original's headers
    [entry] = rows(engine, AuditEntry, AuditEntry.action == "bounce.received")
    assert entry.evidence["format"] == form and entry.evidence["matched_by"] == "envelope tag"


def test_a_bounce_naming_two_recipients_to_the_messages_tag_acts_on_both(engine, acme):
    queue_id, ids = acme(["kijitora@example.jp", "sabatora@example.jp", "tama@example.jp"])
    report = parse_report(fixture("sisimai-lhost-exim-02.eml"))
    outcome = record_report(
        engine, report, Arrival("", "192.0.2.7", (Tag(queue_id, None),)), NOW, RECORDING
    )
    assert outcome.suppressed == ("kijitora@example.jp", "sabatora@example.jp")
    events = rows(engine, DeliveryEvent, DeliveryEvent.kind == "bounce")
    assert [(e.recipient, e.recipient_id) for e in events] == [
        ("kijitora@example.jp", ids["kijitora@example.jp"]),
        ("sabatora@example.jp", ids["sabatora@example.jp"]),
    ]
    [dsn] = rows(engine, Message, Message.mail_from == "")  # one DSN naming both
    assert dsn.data.count(b"Final-Recipient:") == 2
    states = {r.address: r.state for r in rows(engine, Recipient, Recipient.message_id == queue_id)}
    assert states["tama@example.jp"] == "delivered"


def test_the_same_bounce_twice_sends_the_customer_one_dsn(engine, acme):
    queue_id, ids = acme(["kijitora@example.jp"])
    tag = Tag(queue_id, ids["kijitora@example.jp"])
    for _ in range(2):
        report = parse_report(fixture("sisimai-lhost-outlook-02.eml"))
        record_report(engine, report, Arrival("", "192.0.2.7", (tag,)), NOW, RECORDING)
    assert len(rows(engine, Message, Message.mail_from == "")) == 1
    assert len(rows(engine, Suppression)) == 1
    assert len(rows(engine, DeliveryEvent, DeliveryEvent.kind == "bounce")) == 2  # each report


def test_a_tag_naming_a_recipient_the_message_does_not_have_acts_on_nobody(engine, acme):
    queue_id, ids = acme(["kijitora@example.jp"])
    report = parse_report(fixture("sisimai-lhost-outlook-02.eml"))
    stray = Tag(queue_id, max(ids.values()) + 1000)
    outcome = record_report(engine, report, Arrival("", "192.0.2.7", (stray,)), NOW, RECORDING)
    assert not outcome.acted and outcome.suppressed == ()
    assert rows(engine, DeliveryEvent, DeliveryEvent.kind == "bounce") == []
    assert rows(engine, Message, Message.mail_from == "") == []


def test_mail_that_is_no_bounce_is_not_one_even_at_a_tagged_address():
    vacation = (
        b"From: Ann <ann@example.org>\r\nAuto-Submitted: auto-replied\r\nSubject: Out of office"
        b"\r\n\r\nI am away until Monday; for 550 urgent matters call 555 0100.\r\n"
    )
    assert parse_report(vacation, tagged=True) is None


# ------------------------------------------------------------------ complaints
# file, complaint (an event) or other feedback
COMPLAINTS = [
    ("sisimai-arf-02.eml", True),
    ("sisimai-arf-14.eml", True),
    ("sisimai-arf-15.eml", True),
    ("sisimai-arf-17.eml", True),
    ("sisimai-arf-18.eml", False),
]


@pytest.mark.parametrize(("name", "complaint"), COMPLAINTS, ids=lambda v: str(v))
def test_a_complaint_event_per_arf_report(engine, acme, name, complaint):
    report = parse_report(fixture(name))
    assert isinstance(report, Complaint)
    named = list(report.original_rcpt_to or report.original.to)
    recipient = named[0] if named else "reader@example.net"
    queue_id, ids = acme([recipient], message_id=report.original.message_id)
    outcome = record_report(engine, report, Arrival("fbl@example.net", "192.0.2.9"), NOW, RECORDING)
    assert outcome.queue_id == queue_id
    events = rows(engine, DeliveryEvent, DeliveryEvent.kind == "complaint")
    if not complaint:
        assert events == [] and outcome.suppressed == ()
        return
    [event] = events
    assert (event.message_id, event.recipient, event.recipient_id) == (
        queue_id,
        recipient,
        ids[recipient],
    )
    assert (event.tenant_id, event.stream, event.from_domain) == (
        acme.tenant_id,
        "marketing",
        "acme.example",
    )
    assert (event.source_ip, event.provider, event.category) == ("127.0.0.10", "gmail", "abuse")
    assert outcome.suppressed == (recipient,)


def test_a_complaint_quoting_our_return_path_names_the_recipient_the_loop_redacted(engine, acme):
    """Yahoo's report (sent through Amazon SES in the sample) quotes the message's Return-Path,
    which the receiver added at delivery: rewritten to one of ours, its tag names the message
    and the recipient, though Original-Rcpt-To names another address."""
    queue_id, ids = acme(["ann@yahoo.com", "bob@yahoo.com"], message_id="<unrelated@x>")
    data = fixture("sisimai-arf-14.eml")
    ses = re.search(rb"Return-Path: <([^>]+)>", data.split(b"message/rfc822", 1)[1])[1]
    ours = f"bounces+{TAGGER.tag(queue_id, ids['bob@yahoo.com'])}@{HOST}".encode()
    report = parse_report(data.replace(ses, ours))
    outcome = record_report(engine, report, Arrival("fbl@yahoo.com", "192.0.2.9"), NOW, RECORDING)
    assert (outcome.queue_id, outcome.suppressed) == (queue_id, ("bob@yahoo.com",))
    [event] = rows(engine, DeliveryEvent, DeliveryEvent.kind == "complaint")
    assert (event.recipient, event.recipient_id) == ("bob@yahoo.com", ids["bob@yahoo.com"])
    [entry] = rows(engine, AuditEntry, AuditEntry.action == "complaint.received")
    assert entry.evidence["matched_by"] == "return-path tag"


def test_the_sandbox_publishes_spf_for_the_relays_own_bounce_domain():
    """Mail to the simulated providers leaves with bounces+TAG@relay.axiom.test: SPF passes for
    that domain from the relay's IPs, as the operator publishes it in production."""
    from tests.unit.test_sandbox_zones import values, zone

    assert values(zone().answer(HOST, "TXT")) == [f"v=spf1 include:_spf.{HOST} -all"]


def test_an_operator_names_and_publishes_a_return_path_and_it_is_audited(session):
    from protocol.errors import ServiceError
    from protocol.return_paths import set_return_path

    tenant = tenants.add_tenant(session, "acme")
    session.add(Domain(tenant_id=tenant.id, name="acme.example"))
    session.flush()
    domain = set_return_path(session, "acme.example")
    assert (domain.return_path_domain, domain.return_path_published_at) == (
        "bounces.acme.example",
        None,
    )
    domain = set_return_path(session, "acme.example", published=True, now=NOW)
    assert domain.return_path_published_at == NOW
    # another name is not published until said so
    domain = set_return_path(session, "acme.example", name="RP.acme.example.")
    assert (domain.return_path_domain, domain.return_path_published_at) == (
        "rp.acme.example",
        None,
    )
    for bad in ("acme.example", "bounces.other.example", "evilacme.example"):
        with pytest.raises(ServiceError, match=r"not a subdomain of acme\.example"):
            set_return_path(session, "acme.example", name=bad)
    entries = (
        session.exec(select(AuditEntry).where(AuditEntry.action == "domain.return_path"))
        .scalars()
        .all()
    )
    assert [e.evidence["after"] for e in entries] == [
        {"return_path_domain": "bounces.acme.example", "published": False},
        {"return_path_domain": "bounces.acme.example", "published": True},
        {"return_path_domain": "rp.acme.example", "published": False},
    ]
