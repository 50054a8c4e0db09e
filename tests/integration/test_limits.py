"""Limits that keep one client from hurting the others: each a setting, each tested."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import RelayProcess, seed_tenant

pytestmark = pytest.mark.integration

LIMITS = {
    "AXIOM_MAX_CONNECTIONS_PER_CLIENT": "3",
    "AXIOM_MAX_COMMANDS_PER_SESSION": "10",
    "AXIOM_SESSION_IDLE_TIMEOUT_SECONDS": "5",
    "AXIOM_SESSION_MAX_SECONDS": "10",
    "AXIOM_MAX_MESSAGE_SIZE": "4096",
    "AXIOM_MAX_HEADER_FIELDS": "20",
    "AXIOM_MAX_HEADER_FIELD_BYTES": "1000",
    "AXIOM_MAX_SESSION_ERRORS": "3",
}


@pytest.fixture
def limited(axiom_home):
    seed_tenant(axiom_home, "acme", "acme.example", network="127.0.0.0/8")
    relay = RelayProcess(axiom_home, LIMITS).start()
    yield relay
    relay.stop()


class Client:
    def __init__(self, relay: RelayProcess, timeout: float = 15):
        self.sock = socket.create_connection(relay.submission, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return "".join(lines) or "<closed>"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return lines[-1]

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()  # the socket's descriptor closes only when its file object does
        self.sock.close()


def _send(client: Client, message: bytes) -> str:
    assert client.cmd("EHLO client.test").startswith("250")
    assert client.cmd("MAIL FROM:<shop@acme.example>").startswith("250")
    assert client.cmd("RCPT TO:<bob@example.org>").startswith("250")
    assert client.cmd("DATA").startswith("354")
    client.sock.sendall(message + b".\r\n")
    return client.reply()


def test_connections_per_client_address(limited):
    time.sleep(0.5)  # the readiness probe's connection must have been closed on the server side
    clients = [Client(limited) for _ in range(3)]
    greetings = [c.reply() for c in clients]
    assert all(g.startswith("220") for g in greetings), greetings
    extra = Client(limited)
    assert extra.reply() == "421 4.7.0 Too many connections from your address; try again later"
    clients[0].close()
    time.sleep(0.3)
    again = Client(limited)
    assert again.reply().startswith("220")
    for c in (*clients[1:], again, extra):
        c.close()


def test_clients_that_close_at_once_give_their_slots_back(limited):
    # Connect and close without a word, before and after the greeting, more times than the
    # per-address limit (3): each closed connection must give its slot back, or the address
    # is locked out (aiosmtpd under uvloop left such connections half-open).
    for _ in range(4):
        socket.create_connection(limited.submission, timeout=5).close()
        greeted = Client(limited)
        assert greeted.reply().startswith("220")
        greeted.close()
    time.sleep(0.5)
    clients = [Client(limited) for _ in range(3)]
    assert [c.reply()[:3] for c in clients] == ["220", "220", "220"]
    for c in clients:
        c.close()


def test_commands_per_session(limited):
    client = Client(limited)
    client.reply()
    replies = [client.cmd("NOOP") for _ in range(11)]
    assert replies[:10] == ["250 2.0.0 OK"] * 10
    assert replies[10] == "421 4.7.0 Too many NOOP commands in this session"
    client.close()


def test_idle_timeout(limited):
    client = Client(limited)
    client.reply()
    started = time.monotonic()
    assert client.reply() == "421 4.4.2 Idle timeout; closing connection"
    assert 4 <= time.monotonic() - started <= 8


def test_slowloris_hits_the_session_time_limit(limited):
    client = Client(limited)
    client.reply()
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < 20:
        time.sleep(2)  # always inside the idle timeout
        try:
            last = client.cmd("NOOP") if time.monotonic() - started < 9 else client.reply()
        except OSError:
            break
        if last.startswith("421"):
            break
    assert last == "421 4.4.2 Session time limit reached; closing connection"
    assert time.monotonic() - started < 14


def test_message_size(limited):
    client = Client(limited)
    client.reply()
    big = b"From: shop@acme.example\r\nSubject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100
    assert _send(client, big).startswith("552 5.3.4 Message size exceeds fixed maximum")
    assert client.cmd("MAIL FROM:<shop@acme.example> SIZE=5000").startswith("552 5.3.4")
    client.close()


def test_header_count_and_size(limited):
    client = Client(limited)
    client.reply()
    many = (
        b"From: shop@acme.example\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(25))
        + b"\r\nhi\r\n"
    )
    assert _send(client, many) == "552 5.3.4 Too many header fields (limit 20)"
    client.close()
    client = Client(limited)
    client.reply()
    folded = (
        b"From: shop@acme.example\r\nX-Long: " + b"\r\n ".join([b"y" * 60] * 20) + b"\r\n\r\nhi\r\n"
    )
    assert _send(client, folded) == "552 5.3.4 A header field is too large (limit 1000 octets)"
    client.close()


def test_errors_per_session(limited):
    # The default (20) and the reset by an accepted message: tests/integration/
    # test_session_errors.py. Here: the setting is what the relay applies.
    client = Client(limited)
    client.reply()
    assert client.cmd("EHLO client.test").startswith("250")
    replies = [client.cmd("RCPT TO:<bob@example.org>") for _ in range(4)]
    assert replies[:3] == ["503 5.5.1 Need MAIL command first"] * 3
    assert replies[3] == "421 4.7.0 Too many errors, closing connection"
    assert client.reply() == "<closed>"
    client.close()
