"""swaks, a real SMTP client, against a running relay: the three ways a customer submits
(STARTTLS + AUTH PLAIN, STARTTLS + AUTH LOGIN, implicit TLS + AUTH) and the refusals."""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import subprocess

import dkim
import pytest
from sqlmodel import select

from models import DkimKey, Domain, Message, Recipient, RecipientState
from models.db import make_engine, session_scope
from relay.submission.dkim import txt_record_value
from tests.conftest import AxiomHome, RelayProcess, Tenant, seed_tenant
from tests.patching import published_dkimpy

pytestmark = pytest.mark.integration

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
QUEUED = re.compile(r"<~  250 2\.0\.0 Ok: queued as ([0-9A-HJKMNP-TV-Z]{26})\s*$", re.M)


def swaks(host: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SWAKS, "--server", host, "--port", str(port), "--helo", "client.test", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def submit(relay: RelayProcess, tenant: Tenant, *how: str, password: str | None = None):
    host, port = relay.submission_tls if "--tlsc" in how else relay.submission
    return swaks(
        host,
        port,
        *how,
        f"--auth-user={tenant.username}",
        # one argument: a password may begin with '-' (a test's own wrong ones can)
        f"--auth-password={password if password is not None else tenant.password}",
        "--from",
        f"billing@{tenant.domain}",
        "--to",
        "alice@example.org,bob@example.net",
        "--header",
        "Subject: fattura 2024-17",
        "--body",
        "Gentile cliente,\nin allegato la fattura.\n",
        "--timeout",
        "30",
    )


def dkim_dns(home: AxiomHome):
    """A resolver for dkimpy holding the TXT records `axiom domain records` tells customers to
    publish, straight from the keys table."""
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            rows = s.exec(select(DkimKey, Domain).join(Domain)).all()
            records = {
                f"{key.selector}._domainkey.{domain.name}.".encode(): txt_record_value(
                    key.algorithm, key.public_key
                ).encode()
                for key, domain in rows
            }
    finally:
        engine.dispose()

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name if name.endswith(b".") else name + b".")

    return lookup


def spooled(home: AxiomHome, queue_id: str) -> tuple[Message | None, list[Recipient]]:
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            message = s.get(Message, queue_id)
            recipients = s.exec(
                select(Recipient).where(Recipient.message_id == queue_id).order_by(Recipient.id)
            ).all()
            return message, list(recipients)
    finally:
        engine.dispose()


def spool_count(home: AxiomHome) -> int:
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            return len(s.exec(select(Message.id)).all())
    finally:
        engine.dispose()


def assert_signed_and_spooled(home: AxiomHome, tenant: Tenant, result, proto: str) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    match = QUEUED.search(result.stdout)
    assert match, result.stdout
    queue_id = match.group(1)

    message, recipients = spooled(home, queue_id)
    assert message is not None, f"{queue_id} accepted but not in the spool"
    assert message.mail_from == f"billing@{tenant.domain}"
    assert message.header_from_domain == tenant.domain
    assert message.auth_user == tenant.username
    assert message.size == len(message.data)
    assert [(r.address, r.domain) for r in recipients] == [
        ("alice@example.org", "example.org"),
        ("bob@example.net", "example.net"),
    ]
    # the relay's delivery runs beside submission: a recipient may already have had its first
    # attempt when the spool is read (a run with three workers read alice bounced), never expired
    assert {r.state for r in recipients} <= {
        RecipientState.queued,
        RecipientState.delivered,
        RecipientState.bounced,
    }, recipients

    data = message.data
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"DKIM-Signature:"), head[:200]
    assert len(re.findall(rb"^DKIM-Signature:", head, re.M)) == 2
    assert b"a=rsa-sha256" in head and b"a=ed25519-sha256" in head
    assert f"d={tenant.domain}".encode() in head
    assert re.search(rf"with {proto} id {queue_id};".encode(), head), head
    assert b"Subject: fattura 2024-17" in head
    assert b"Gentile cliente,\r\nin allegato la fattura.\r\n" in data.partition(b"\r\n\r\n")[2]

    # Both signatures verify against the published keys, as a receiver would check them.
    lookup = dkim_dns(home)
    with published_dkimpy():  # never through the relay's patches
        verifier = dkim.DKIM(data)
        assert verifier.verify(idx=0, dnsfunc=lookup), "first DKIM-Signature does not verify"
        assert verifier.verify(idx=1, dnsfunc=lookup), "second DKIM-Signature does not verify"


def test_starttls_auth_plain(relay, axiom_home):
    tenant = seed_tenant(axiom_home, "acme", "acme.test")
    result = submit(relay, tenant, "--tls", "--auth", "PLAIN")
    assert "~> AUTH PLAIN" in result.stdout
    assert "<~  235 2.7.0" in result.stdout
    assert_signed_and_spooled(axiom_home, tenant, result, "ESMTPSA")


def test_starttls_auth_login(relay, axiom_home):
    tenant = seed_tenant(axiom_home, "acme", "acme.test")
    result = submit(relay, tenant, "--tls", "--auth", "LOGIN")
    assert "~> AUTH LOGIN" in result.stdout
    assert "<~  235 2.7.0" in result.stdout
    assert_signed_and_spooled(axiom_home, tenant, result, "ESMTPSA")


def test_implicit_tls_auth(relay, axiom_home):
    tenant = seed_tenant(axiom_home, "acme", "acme.test")
    result = submit(relay, tenant, "--tlsc", "--auth", "PLAIN")
    assert "=== TLS started" in result.stdout
    assert "STARTTLS" not in result.stdout  # encrypted from the first byte
    assert "<~  235 2.7.0" in result.stdout
    assert_signed_and_spooled(axiom_home, tenant, result, "ESMTPSA")


def test_auth_without_tls_is_refused(relay, axiom_home):
    tenant = seed_tenant(axiom_home, "acme", "acme.test")
    # swaks does not even try: AUTH is not offered before STARTTLS.
    result = submit(relay, tenant, "--auth", "PLAIN")
    assert result.returncode != 0, result.stdout
    assert "250-AUTH" not in result.stdout and "250 AUTH" not in result.stdout
    assert "Host did not advertise authentication" in result.stdout + result.stderr

    # A client that sends AUTH anyway, in plaintext, gets 538 and is not authenticated.
    blob = base64.b64encode(f"\0{tenant.username}\0{tenant.password}".encode()).decode()
    with smtplib.SMTP(*relay.submission, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        code, text = smtp.docmd("AUTH", f"PLAIN {blob}")
        assert (code, text.split(b" ", 1)[0]) == (538, b"5.7.11"), (code, text)
        code, text = smtp.docmd("MAIL", f"FROM:<billing@{tenant.domain}>")
        assert (code, text.split(b" ", 1)[0]) == (530, b"5.7.0"), (code, text)
    assert spool_count(axiom_home) == 0


def test_wrong_password_is_refused(relay, axiom_home):
    tenant = seed_tenant(axiom_home, "acme", "acme.test")
    result = submit(relay, tenant, "--tls", "--auth", "PLAIN", password=tenant.password + "x")
    assert result.returncode != 0, result.stdout
    assert "<~* 535 5.7.8" in result.stdout or "<~  535 5.7.8" in result.stdout, result.stdout
    assert "queued as" not in result.stdout
    assert spool_count(axiom_home) == 0
