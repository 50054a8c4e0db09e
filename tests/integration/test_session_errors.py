"""Hardening of a submission session against a running relay: the per-session error limit
(Postfix's smtpd_hard_error_limit), NUL in DATA, and pipelined command groups (RFC 2920) with
the EHLO keywords that announce them."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from relay.submission import replies
from tests.conftest import RelayProcess, seed_tenant
from tests.integration.test_swaks import spool_count

pytestmark = pytest.mark.integration

TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
SYNTAX_ERROR = "500 5.5.2 Syntax error"
GARBAGE = b"\xff\xfe\x00\x9c binary garbage \x01\x02"
MESSAGE = b"From: Shop <shop@acme.example>\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def db_url(tmp_path) -> str:
    """SQLite only: nothing checked here depends on the database backend."""
    return f"sqlite:///{tmp_path / 'axiom.db'}"


@pytest.fixture
def relay(axiom_home):
    seed_tenant(axiom_home, "acme", "acme.example", network="127.0.0.0/8")
    relay = RelayProcess(axiom_home, {"AXIOM_DELIVERY_ENABLED": "false"}).start()
    yield relay
    relay.stop()


class Client:
    """A raw socket: every reply as the relay wrote it, "<closed>" once it hung up."""

    def __init__(self, relay: RelayProcess):
        self.sock = socket.create_connection(relay.submission, timeout=15)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220 ")

    def reply(self) -> str:
        lines = []
        while True:
            try:
                line = self.file.readline()
            except ConnectionResetError:
                line = b""
            if not line:
                return "\n".join(lines) or "<closed>"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes | str) -> str:
        try:
            self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return "<closed>"
        return self.reply()

    def message(self, body: bytes = MESSAGE, rcpt: str = "bob@example.org") -> str:
        """MAIL, RCPT and DATA one by one; DATA's final reply."""
        assert self.cmd("MAIL FROM:<shop@acme.example>") == "250 2.1.0 Sender OK"
        assert self.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Recipient OK"
        assert self.cmd("DATA").startswith("354 ")
        self.send(body + b".\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_binary_garbage_gets_twenty_errors_then_421_and_the_connection_closes(relay):
    client = Client(relay)
    replies = [client.cmd(GARBAGE) for _ in range(30)]
    assert replies[:20] == [SYNTAX_ERROR] * 20
    assert replies[20] == TOO_MANY_ERRORS
    assert replies[21:] == ["<closed>"] * 9
    client.close()


def test_refused_commands_of_every_kind_count_toward_the_limit(relay):
    client = Client(relay)
    assert client.cmd("EHLO client.test").startswith("250-")
    mistakes = [
        "RCPT TO:<bob@example.org>",  # 503: no MAIL yet
        "MAIL FROM:<shop@not-ours.example>",  # 550: not the tenant's domain
        "DATA",  # 503
        "VRFY",  # 501
    ]
    replies = [client.cmd(mistakes[i % len(mistakes)]) for i in range(20)]
    assert all(r[:1] in "45" for r in replies), replies
    assert client.cmd("NOOP") == "250 2.0.0 OK"  # a good command is no error
    assert client.cmd("RCPT TO:<bob@example.org>") == TOO_MANY_ERRORS
    assert client.cmd("NOOP") == "<closed>"
    client.close()


def test_a_session_with_a_few_errors_is_unaffected(relay):
    client = Client(relay)
    assert client.cmd("EHLO client.test").startswith("250-")
    assert client.cmd("MAIL FROM:<shop@not-ours.example>").startswith("550 5.7.1 ")
    assert client.cmd("MAIL FROM:<shop@acme.example>") == "250 2.1.0 Sender OK"
    assert client.cmd("RCPT TO:<bob@localhost>") == "501 5.1.3 Bad recipient address syntax"
    assert client.cmd("RCPT TO:<u%h.example@example.org>").startswith("501 5.1.3 ")
    assert client.cmd(GARBAGE) == SYNTAX_ERROR
    assert client.cmd("RCPT TO:<bob@example.org>") == "250 2.1.5 Recipient OK"
    assert client.cmd("DATA").startswith("354 ")
    client.send(MESSAGE + b".\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    assert client.cmd("QUIT") == "221 2.0.0 Bye"
    client.close()
    assert spool_count(relay.home) == 1


def test_an_accepted_message_resets_the_count(relay):
    # "errors ... without delivering mail" (Postfix): a client that sends many messages in
    # one session, with a refused recipient now and then, is not cut off.
    client = Client(relay)
    assert client.cmd("EHLO client.test").startswith("250-")
    for _ in range(3):
        for _ in range(15):
            assert client.cmd(GARBAGE) == SYNTAX_ERROR
        assert client.message().startswith("250 2.0.0 Ok: queued as ")
    assert client.cmd("QUIT") == "221 2.0.0 Bye"
    client.close()
    assert spool_count(relay.home) == 3


def test_nul_in_data_is_refused_and_nothing_is_spooled(relay):
    # A receiver that drops NULs would read "\r\n\0.\r\n" as the end of the data and the
    # rest as commands: a second, smuggled message.
    smuggled = (
        MESSAGE + b"\x00.\r\nMAIL FROM:<shop@acme.example>\r\nRCPT TO:<eve@example.org>\r\n"
        b"DATA\r\nFrom: shop@acme.example\r\n\r\nsmuggled\r\n"
    )
    client = Client(relay)
    assert client.cmd("EHLO client.test").startswith("250-")
    refused = client.message(smuggled)
    assert refused == "550 5.6.0 Message contains NUL characters (RFC 5322 3.5, RFC 2045 2.8)"
    assert client.message(MESSAGE.replace(b"Hello.", b"He\x00llo.")) == refused  # anywhere
    assert spool_count(relay.home) == 0
    assert client.message().startswith("250 2.0.0 Ok: queued as ")  # the session goes on
    client.close()
    assert spool_count(relay.home) == 1


def test_ehlo_offers_pipelining_and_enhanced_status_codes(relay):
    with smtplib.SMTP(*relay.submission, local_hostname="client.test", timeout=10) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250
        assert smtp.has_extn("pipelining") and smtp.has_extn("enhancedstatuscodes")
        assert smtp.esmtp_features["pipelining"] == ""
        last = smtp.ehlo_resp.decode().splitlines()[-1]
        assert last == "HELP"  # the keywords come before aiosmtpd's last line


def test_a_pipelined_group_is_answered_in_order(relay):
    # RFC 2920: MAIL, RCPT..., DATA in one write; one reply each, in order; the body after
    # the 354. A refused recipient inside the group refuses only itself.
    client = Client(relay)
    assert "250-PIPELINING" in client.cmd("EHLO client.test")
    client.send(
        b"MAIL FROM:<shop@acme.example>\r\n"
        b"RCPT TO:<bob@example.org>\r\n"
        b"RCPT TO:<bob@localhost>\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"DATA\r\n"
    )
    group = [client.reply() for _ in range(5)]
    assert group == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "501 5.1.3 Bad recipient address syntax",
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    # The body, the next group's commands and QUIT in one more write.
    client.send(MESSAGE + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    assert client.reply().startswith("250 2.0.0 Ok: queued as ")
    assert [client.reply() for _ in range(3)] == ["250 2.0.0 OK", "250 2.0.0 OK", "221 2.0.0 Bye"]
    client.close()
    assert spool_count(relay.home) == 1


def test_an_over_long_auth_answer_is_refused_like_a_long_command(relay):
    """An AUTH LOGIN answer past the line limit (found by test_fuzz) gets 500 5.5.2 and the
    session goes on: not 451 4.3.0 internal error."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test relay's certificate is self-signed
    raw = socket.create_connection(relay.submission_tls, timeout=15)
    client = Client.__new__(Client)
    client.sock = context.wrap_socket(raw)
    client.file = client.sock.makefile("rb")
    try:
        assert client.reply().startswith("220 ")
        assert client.cmd("EHLO fuzz.example").startswith("250")
        assert client.cmd("AUTH LOGIN").startswith("334 ")
        assert client.cmd(b"A" * 5_000) == replies.LINE_TOO_LONG  # one TLS record
        assert client.cmd("NOOP").startswith("250")
    finally:
        client.close()
    assert b"internal error" not in relay.log.read_bytes()
