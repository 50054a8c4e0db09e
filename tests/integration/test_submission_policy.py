"""Every bad input gets its exact reply and leaves nothing in the spool; nothing is open."""

from __future__ import annotations

import base64
import functools
import smtplib
import socket
import ssl

import pytest
from sqlmodel import Session, func, select

from models import Message, Recipient
from models.db import make_engine
from tests.conftest import seed_tenant

pytestmark = pytest.mark.integration


@functools.cache  # one context (the system CA bundle loaded once: 23 ms a context), never changed
def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _message(from_header: str, to: str = "bob@example.org", extra: str = "") -> bytes:
    return (
        f"From: {from_header}\r\nTo: {to}\r\nSubject: order 42\r\n{extra}\r\n"
        "Thank you for your order.\r\n"
    ).encode()


def spool_counts(db_url: str) -> tuple[int, int]:
    engine = make_engine(db_url)
    try:
        with Session(engine) as s:
            return (
                s.exec(select(func.count()).select_from(Message)).one(),
                s.exec(select(func.count()).select_from(Recipient)).one(),
            )
    finally:
        engine.dispose()


@pytest.fixture
def world(axiom_home, relay):
    acme = seed_tenant(axiom_home, "acme", "acme.example")
    other = seed_tenant(axiom_home, "other", "other.example")
    seed_tenant(axiom_home, "late", "pending.example", activate=False)
    return {"home": axiom_home, "relay": relay, "acme": acme, "other": other}


def login(relay, tenant) -> smtplib.SMTP:
    client = smtplib.SMTP(*relay.submission, timeout=10)
    client.starttls(context=_tls())
    client.login(tenant.username, tenant.password)
    return client


def test_authenticated_submission_is_signed_and_spooled(world):
    relay, acme = world["relay"], world["acme"]
    with login(relay, acme) as client:
        client.mail("shop@acme.example")
        client.rcpt("bob@example.org")
        client.rcpt("carol@example.net")
        code, reply = client.data(_message("Shop <shop@acme.example>"))
    assert code == 250
    assert reply.decode().startswith("2.0.0 Ok: queued as ")
    queue_id = reply.decode().rsplit(" ", 1)[1]
    engine = make_engine(world["home"].db_url)
    with Session(engine) as s:
        message = s.get(Message, queue_id)
        rcpts = s.exec(select(Recipient.address).where(Recipient.message_id == queue_id)).all()
    engine.dispose()
    assert sorted(rcpts) == ["bob@example.org", "carol@example.net"]
    head = message.data.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in head and b"a=ed25519-sha256" in head
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head  # added when missing
    assert b"Received: from " in head and b"with ESMTPSA id " + queue_id.encode() in head
    assert message.auth_user == "acme-app" and message.stream == "transactional"


def test_stream_header_selects_stream_and_is_removed(world):
    relay, acme = world["relay"], world["acme"]
    with login(relay, acme) as client:
        refused = client.sendmail(
            "shop@acme.example",
            ["bob@example.org"],
            _message("shop@acme.example", extra="X-Axiom-Stream: marketing\r\n"),
        )
        assert refused == {}
    engine = make_engine(world["home"].db_url)
    with Session(engine) as s:
        # the customer's message (a DSN the relay may write meanwhile has the null sender)
        message = s.exec(select(Message).where(Message.mail_from == "shop@acme.example")).one()
    engine.dispose()
    assert message.stream == "marketing"
    assert b"X-Axiom-Stream" not in message.data


def test_warmup_candidate_header_marks_the_message_and_is_removed_before_signing(world):
    """runbooks/ip-warmup.yaml candidate_header: 1/yes/true in any case mark the message as a
    warm-up candidate; any other value does not; the header never reaches the recipient."""
    relay, acme = world["relay"], world["acme"]
    values = {"yes": True, "TRUE": True, "1": True, "no": False, "": None}
    with login(relay, acme) as client:
        for value in values:
            extra = f"X-Axiom-Warmup: {value}\r\n" if value else ""
            refused = client.sendmail(
                "shop@acme.example",
                [f"w-{value or 'none'}@example.org"],
                _message("shop@acme.example", extra=extra),
            )
            assert refused == {}
    engine = make_engine(world["home"].db_url)
    with Session(engine) as s:
        rows = s.exec(
            select(Recipient.address, Message)
            .join(Message, Message.id == Recipient.message_id)
            .where(Message.mail_from == "shop@acme.example")
        ).all()
    engine.dispose()
    marked = {address.split("@")[0][2:]: m.warmup_candidate for address, m in rows}
    assert marked == {"yes": True, "TRUE": True, "1": True, "no": False, "none": False}
    for _, message in rows:
        assert b"X-Axiom-Warmup" not in message.data
        head = message.data.split(b"\r\n\r\n", 1)[0]
        assert b"h=" in head and b"x-axiom-warmup" not in head.lower()


def _expect(client_call, code: int, text_start: str):
    try:
        result = client_call()
    except smtplib.SMTPResponseException as exc:
        result = (exc.smtp_code, exc.smtp_error)
    except smtplib.SMTPRecipientsRefused as exc:
        result = next(iter(exc.recipients.values()))
    except smtplib.SMTPSenderRefused as exc:
        result = (exc.smtp_code, exc.smtp_error)
    got_code, got_text = result
    assert (got_code, got_text.decode()[: len(text_start)]) == (code, text_start)


def test_auth_failures(world):
    relay, acme = world["relay"], world["acme"]
    client = smtplib.SMTP(*relay.submission, timeout=10)
    client.ehlo()
    # Before STARTTLS AUTH is neither offered nor accepted.
    assert "auth" not in client.esmtp_features
    blob = base64.b64encode(f"\0{acme.username}\0{acme.password}".encode()).decode()
    _expect(lambda: client.docmd("AUTH", f"PLAIN {blob}"), 538, "5.7.11 Encryption required")
    client.starttls(context=_tls())
    client.ehlo()
    assert "PLAIN" in client.esmtp_features["auth"] and "LOGIN" in client.esmtp_features["auth"]
    _expect(lambda: client.login(acme.username, "wrong"), 535, "5.7.8 Authentication credentials")
    client.quit()


def test_brute_force_locks_out_the_client_address(world):
    relay, acme = world["relay"], world["acme"]
    # Default: 5 failures in 300 s lock the address out for 900 s.
    wrong = base64.b64encode(f"\0{acme.username}\0wrong".encode()).decode()
    replies = []
    for _ in range(6):
        client = smtplib.SMTP(*relay.submission, timeout=10)
        client.starttls(context=_tls())
        client.ehlo()
        try:
            replies.append(client.docmd("AUTH", f"PLAIN {wrong}"))
        except smtplib.SMTPServerDisconnected:
            replies.append((None, b"disconnected"))
        client.close()
    assert [code for code, _ in replies[:4]] == [535] * 4
    assert replies[4] == (
        421,
        b"4.7.0 Too many failed authentications from your address; try again later",
    )
    assert replies[5][0] == 421
    # Even the right password is refused while locked out.
    client = smtplib.SMTP(*relay.submission, timeout=10)
    client.starttls(context=_tls())
    client.ehlo()
    right = base64.b64encode(f"\0{acme.username}\0{acme.password}".encode()).decode()
    assert client.docmd("AUTH", f"PLAIN {right}")[0] == 421
    audit = world["home"].cli("audit", "--json").stdout
    assert '"action": "auth.lockout"' in audit and "client:127.0.0.1" in audit


def test_policy_matrix_exact_replies_and_nothing_spooled(world):
    relay, acme = world["relay"], world["acme"]
    cases = [
        # (sender, recipients, message, expected code, expected text start)
        ("shop@other.example", ["bob@example.org"], None, 550, "5.7.1 Sender domain other.example"),
        ("shop@pending.example", ["bob@example.org"], None, 550, "5.7.1 Sender domain pending"),
        ("shop@unknown.example", ["bob@example.org"], None, 550, "5.7.1 Sender domain unknown"),
        ("shop@acme.example", ["bob%evil.example@example.org"], None, 501, "5.1.3 Percent-hack"),
        ("shop@acme.example", ["evil!bob@example.org"], None, 501, "5.1.3 Percent-hack"),
        ("shop@acme.example", ["@relay.example:bob@example.org"], None, 501, "5.1.3 Bad recipient"),
        ("shop@acme.example", ["not-an-address"], None, 501, "5.1.3 Bad recipient"),
        # A malformed or source-routed sender is a sender error (X.1.7), not a recipient one.
        ("shop@@acme.example", ["bob@example.org"], None, 501, "5.1.7 Bad sender address"),
        ("@relay.example:shop@acme.example", ["bob@example.org"], None, 501, "5.1.7 Bad sender"),
        # A header line that is no field (an SMTP command sent as data): refused, not a 451.
        (
            "shop@acme.example",
            ["bob@example.org"],
            b"RCPT TO: <r0@dest.example>\r\nFrom: <shop@acme.example>\r\n\r\nbody\r\n",
            550,
            "5.6.0 Malformed message header",
        ),
        # Header From of another tenant's domain: refused at DATA.
        (
            "shop@acme.example",
            ["bob@example.org"],
            _message("ceo@other.example"),
            550,
            "5.7.1 Header From domain other.example",
        ),
        (
            "shop@acme.example",
            ["bob@example.org"],
            _message("a@acme.example, b@acme.example"),
            550,
            "5.6.0 Message must have exactly one From",
        ),
        (
            "shop@acme.example",
            ["bob@example.org"],
            b"Subject: no from\r\n\r\nbody\r\n",
            550,
            "5.6.0 Message must have exactly one From",
        ),
    ]
    for sender, rcpts, message, code, text in cases:
        with login(relay, acme) as client:
            if message is None:
                resp = _first_refusal(client, sender, rcpts[0])
            else:
                client.mail(sender)
                client.rcpt(rcpts[0])
                resp = client.data(message)
            assert (resp[0], resp[1].decode()[: len(text)]) == (code, text), (sender, rcpts)
    assert spool_counts(world["home"].db_url) == (0, 0)


def test_addresses_the_stdlib_parser_trips_over_get_501_not_451(world):
    # email._header_value_parser raises AttributeError (not HeaderParseError) on "<0@[0>";
    # sent raw, since smtplib would rewrite the address. Before: 451 4.3.0, retried forever.
    relay, acme = world["relay"], world["acme"]
    with login(relay, acme) as client:
        code, text = client.docmd("MAIL", "FROM:<0@[0>")
        assert (code, text.decode()[:24]) == (501, "5.1.7 Bad sender address")
        assert client.mail("shop@acme.example")[0] == 250
        code, text = client.docmd("RCPT", "TO:<0@[0>")
        assert (code, text.decode()[:19]) == (501, "5.1.3 Bad recipient")
    assert spool_counts(world["home"].db_url) == (0, 0)


def _first_refusal(client: smtplib.SMTP, sender: str, rcpt: str):
    code, text = client.mail(sender)
    if code != 250:
        return code, text
    return client.rcpt(rcpt)


def test_no_relaying_without_auth(world):
    relay = world["relay"]
    client = smtplib.SMTP(*relay.submission, timeout=10)
    client.ehlo()
    assert client.mail("shop@acme.example") == (530, b"5.7.0 Authentication required")
    # Even after TLS, no AUTH means no relaying.
    client.starttls(context=_tls())
    client.ehlo()
    assert client.mail("shop@acme.example") == (530, b"5.7.0 Authentication required")
    code, _ = client.rcpt("bob@example.org")
    assert code == 503  # no MAIL accepted, so no RCPT either
    client.quit()
    assert spool_counts(world["home"].db_url) == (0, 0)


def test_recipient_limit_and_size_limit(world):
    relay, acme = world["relay"], world["acme"]
    with login(relay, acme) as client:
        client.mail("shop@acme.example")
        for i in range(100):
            assert client.rcpt(f"r{i}@example.org")[0] == 250
        assert client.rcpt("r100@example.org") == (452, b"4.5.3 Too many recipients")
        client.rset()
        code, text = client.mail("shop@acme.example", ["SIZE=999999999"])
        assert (code, text.decode()[:9]) == (552, "5.3.4 Mes")
    assert spool_counts(world["home"].db_url) == (0, 0)


def test_suppressed_recipient_is_refused_with_reason(world):
    from models import Suppression, Tenant
    from models.db import session_scope

    engine = make_engine(world["home"].db_url)
    with session_scope(engine) as s:
        tenant = s.exec(select(Tenant).where(Tenant.name == "acme")).one()
        s.add(Suppression(tenant_id=tenant.id, address="gone@example.org", reason="hard bounce"))
        s.commit()
    engine.dispose()
    with login(world["relay"], world["acme"]) as client:
        client.mail("shop@acme.example")
        assert client.rcpt("gone@example.org") == (
            550,
            b"5.7.1 Recipient gone@example.org is on your suppression list: hard bounce",
        )
    # Another tenant's suppression list does not apply.
    with login(world["relay"], world["other"]) as client:
        client.mail("shop@other.example")
        assert client.rcpt("gone@example.org")[0] == 250


@pytest.mark.parametrize(
    "payload",
    [
        b"From: shop@acme.example\r\n\r\nhello\n.\r\nMAIL FROM:<x@acme.example>\r\n",
        b"From: shop@acme.example\r\n\r\nhello\r.\r\nMAIL FROM:<x@acme.example>\r\n",
        b"From: shop@acme.example\r\n\r\nhello\r\n.\nMAIL FROM:<x@acme.example>\r\n",
        b"From: shop@acme.example\r\n\r\nhello\n.\nMAIL FROM:<x@acme.example>\r\n",
        b"From: shop@acme.example\r\n\r\nhello\r\n.\rMAIL FROM:<x@acme.example>\r\n",
        b"From: shop@acme.example\r\n\r\nhello\nworld\r\n",
    ],
)
def test_smuggling_sequences_are_refused(world, payload):
    reply = _raw_dialog(world, payload)
    assert reply.startswith(b"550 5.6.0 Bare CR or LF in message data"), reply
    assert spool_counts(world["home"].db_url) == (0, 0)


def test_overlong_line_is_refused(world):
    reply = _raw_dialog(world, b"From: shop@acme.example\r\n\r\n" + b"x" * 999 + b"\r\n")
    assert reply.startswith(b"500 5.5.2 Line too long"), reply
    assert spool_counts(world["home"].db_url) == (0, 0)


def _raw_dialog(world, payload: bytes) -> bytes:
    """Drive DATA over a raw TLS socket, so the payload's bytes reach the server unchanged."""
    relay, acme = world["relay"], world["acme"]
    sock = socket.create_connection(relay.submission_tls, timeout=10)
    conn = _tls().wrap_socket(sock)
    reader = conn.makefile("rb")

    def reply() -> bytes:
        lines = []
        while True:
            line = reader.readline()
            lines.append(line)
            if line[3:4] != b"-":
                return line

    reply()
    blob = base64.b64encode(f"\0{acme.username}\0{acme.password}".encode())
    for command in (
        b"EHLO t",
        b"AUTH PLAIN " + blob,
        b"MAIL FROM:<shop@acme.example>",
        b"RCPT TO:<bob@example.org>",
        b"DATA",
    ):
        conn.sendall(command + b"\r\n")
        reply()
    conn.sendall(payload + b".\r\n")
    final = reply()
    conn.sendall(b"QUIT\r\n")
    conn.close()
    return final.rstrip()
