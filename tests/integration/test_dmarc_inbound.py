"""DMARC aggregate reports through a running `axiom relay`'s inbound listener (SQLite and
PostgreSQL): a report mailed to dmarc@ the relay's host is stored before its 250, a second copy
is acknowledged and stored once, mail that is no report is refused with its exact reply, and the
query service and `axiom dmarc reports` read back what was stored."""

from __future__ import annotations

import gzip
import io
import json
import smtplib
import ssl
import zipfile
from datetime import UTC, datetime
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from pathlib import Path

import pytest
from sqlmodel import select

from models import IpAddress
from models.db import make_engine, session_scope
from models.dmarc import DmarcRecord, DmarcReport
from protocol.dmarc_reports import our_failures, summary
from tests.conftest import RelayProcess, seed_tenant

pytestmark = pytest.mark.integration

DMARC = "dmarc@relay.axiom.test"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "dmarc"
NO_VERIFY = ssl.create_default_context()
NO_VERIFY.check_hostname, NO_VERIFY.verify_mode = False, ssl.CERT_NONE
SINCE, UNTIL = datetime(2019, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def relay(axiom_home):
    proc = RelayProcess(axiom_home, {"AXIOM_DELIVERY_ENABLED": "false"}).start()
    yield proc
    proc.stop()


@pytest.fixture
def engine(axiom_home):
    engine = make_engine(axiom_home.db_url)
    yield engine
    engine.dispose()


def report_mail(sender: str, subject: str, attachment: MIMEApplication) -> bytes:
    """A report mail as receivers send it: a line of text and the report attached."""
    message = MIMEMultipart()
    message["From"] = sender
    message["To"] = DMARC
    message["Subject"] = subject
    message.attach(MIMEText(f"This is an aggregate report from {sender}."))
    message.attach(attachment)
    return message.as_bytes(policy=SMTP)  # CRLF: smtplib sends bytes as they are


def google_zip() -> bytes:
    """sandbox-google.xml zipped and mailed as Google does."""
    name = "google.com!acme.example!1549929600!1550015999"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{name}.xml", (FIXTURES / "sandbox-google.xml").read_bytes())
    return report_mail(
        "noreply-dmarc-support@google.com",
        "Report domain: acme.example Submitter: google.com Report-ID: 949348866075514174",
        MIMEApplication(buffer.getvalue(), "zip", Name=f"{name}.zip"),
    )


def outlook_gzip() -> bytes:
    """sandbox-outlook.xml gzipped and mailed as Outlook.com does."""
    name = "protection.outlook.com!acme.example!1709683200!1709769600"
    return report_mail(
        "dmarcreport@microsoft.com",
        "Report Domain: acme.example Submitter: protection.outlook.com Report-ID: <a4f4ef06>",
        MIMEApplication(
            gzip.compress((FIXTURES / "sandbox-outlook.xml").read_bytes()),
            "gzip",
            Name=f"{name}.xml.gz",
        ),
    )


def send(relay: RelayProcess, sender: str, rcpt: str, data: bytes) -> tuple[int, str]:
    with smtplib.SMTP(*relay.inbound, timeout=30) as client:
        client.ehlo("mail-it1-f201.google.com")
        client.starttls(context=NO_VERIFY)
        client.ehlo("mail-it1-f201.google.com")
        code, reply = client.mail(sender)
        assert code == 250, reply
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
        code, reply = client.data(data)
    return code, reply.decode()


def counts(engine) -> tuple[int, int]:
    with session_scope(engine) as s:
        reports = len(s.exec(select(DmarcReport)).all())
        records = len(s.exec(select(DmarcRecord)).all())
    return reports, records


def test_reports_are_stored_before_250_once_and_read_back(axiom_home, relay, engine):
    seed_tenant(axiom_home, "acme", "acme.example")
    axiom_home.cli("pool", "add", "shared")
    axiom_home.cli("ip", "add", "127.0.0.10", "--pool", "shared")
    google, outlook = google_zip(), outlook_gzip()

    code, reply = send(relay, "noreply-dmarc-support@google.com", DMARC, google)
    assert (code, reply) == (250, "2.0.0 Ok: DMARC aggregate report recorded, 1 record(s)")
    assert counts(engine) == (1, 1)  # committed before the 250
    code, reply = send(relay, "dmarcreport@microsoft.com", DMARC, outlook)
    assert (code, reply) == (250, "2.0.0 Ok: DMARC aggregate report recorded, 2 record(s)")
    assert counts(engine) == (2, 3)

    # the same report again (a receiver that lost our 250): acknowledged, stored once
    code, reply = send(relay, "noreply-dmarc-support@google.com", DMARC, google)
    assert (code, reply) == (250, "2.0.0 Ok: DMARC aggregate report already recorded")
    assert counts(engine) == (2, 3)

    with session_scope(engine) as s:
        rows = summary(s, domain="acme.example", since=SINCE, until=UNTIL)
        failing = our_failures(s, since=SINCE, min_messages=1)
        ours = {a.address for a in s.exec(select(IpAddress)).all()}
    assert "127.0.0.10" in ours and "192.0.2.25" not in ours
    assert [
        (r.source_ip, r.ours, r.messages, r.dmarc_pass, r.dmarc_fail, r.reporters) for r in rows
    ] == [
        ("192.0.2.25", False, 3, 3, 0, ("Outlook.com",)),
        ("127.0.0.10", True, 1, 0, 1, ("google.com",)),
    ]
    assert [(r.domain, r.source_ip, r.dmarc_fail) for r in failing] == [
        ("acme.example", "127.0.0.10", 1)
    ]

    listed = json.loads(
        axiom_home.cli(
            "dmarc", "reports", "--domain", "acme.example", "--since", "4000d", "--json"
        ).stdout
    )
    assert [(r["source_ip"], r["ours"], r["messages"], r["dmarc_fail"]) for r in listed] == [
        ("192.0.2.25", False, 3, 0),
        ("127.0.0.10", True, 1, 1),
    ]
    table = axiom_home.cli(
        "dmarc", "reports", "--since", "4000d", extra_env={"COLUMNS": "120"}
    ).stdout
    assert "127.0.0.10" in table and "Outlook.com" in table
    assert "no reports in this period" in axiom_home.cli("dmarc", "reports", "--since", "1d").stdout
    assert axiom_home.cli("dmarc", "reports", "--since", "7x", check=False).returncode == 2


def test_what_is_not_a_report_of_ours_is_refused_with_its_reply(axiom_home, relay, engine):
    seed_tenant(axiom_home, "acme", "acme.example")
    code, reply = send(
        relay,
        "someone@example.net",
        DMARC,
        b"From: someone@example.net\r\nSubject: unsubscribe\r\n\r\nPlease remove me.\r\n",
    )
    assert (code, reply) == (
        550,
        "5.7.1 Not a DMARC aggregate report: only RFC 7489 aggregate reports (XML, gzip or zip)"
        " are accepted here",
    )
    # a real Google report mail, about somebody else's domain
    code, reply = send(
        relay,
        "noreply-dmarc-support@google.com",
        DMARC,
        (FIXTURES / "google-zip.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
    )
    assert (code, reply) == (
        550,
        "5.7.1 DMARC aggregate report about borschow.com, which does not send through this relay",
    )
    hostile = report_mail(
        "x@example.net",
        "Report domain: acme.example",
        MIMEApplication(
            b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY a "a">]><feedback>&a;</feedback>',
            "xml",
            Name="x.xml",
        ),
    )
    code, reply = send(relay, "x@example.net", DMARC, hostile)
    assert (code, reply) == (
        550,
        "5.6.0 DMARC aggregate report refused: document type declarations are not accepted",
    )
    assert counts(engine) == (0, 0)
    # a transaction is for DMARC reports or for the other reports, not both
    with smtplib.SMTP(*relay.inbound, timeout=30) as client:
        client.ehlo("mx.example.net")
        client.mail("x@example.net")
        assert client.rcpt(DMARC)[0] == 250
        code, reply = client.rcpt("fbl@relay.axiom.test")
        assert (code, reply.decode()) == (
            452,
            "4.5.3 DMARC reports and other reports go in separate transactions; send to this"
            " recipient again",
        )
        code, reply = client.rcpt("dmarc@other.example")
        assert code == 550  # no relaying: not our domain
