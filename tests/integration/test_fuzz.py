"""Hypothesis-driven SMTP dialogs over raw sockets against one running relay.

Random verbs, arguments and raw bytes (NUL, bare CR/LF, over-long lines, non-UTF-8), on the
plain listener (from an unbound and from a network-bound loopback address, with STARTTLS and
AUTH along the way) and on the implicit-TLS listener. After every dialog: the relay is alive,
every reply line is a well-formed SMTP reply with no leaked exception, and the spool holds
exactly the messages the client was told were queued — each one whole.
"""

from __future__ import annotations

import base64
import re
import secrets
import smtplib
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from models import Message, Recipient
from models.db import make_engine, session_scope
from protocol import tenants
from tests.conftest import AxiomHome, RelayProcess, Tenant, seed_tenant

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 150
BUDGET_SECONDS = 60.0
BOUND_SOURCE = "127.0.0.3"  # bound to the "fuzznet" tenant: MAIL/RCPT/DATA without AUTH
AUTH_DOMAIN = "fuzz-auth.example"
NET_DOMAIN = "fuzz-net.example"
MARKER = b"@@DIALOG@@"  # replaced by the dialog's id when the dialog runs

REPLY_LINE = re.compile(rb"^([2-5][0-5][0-9])([ -](.*))?$", re.DOTALL)
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-Z]{26})$")
LEAKS = re.compile(rb"Error: \(|Traceback|Exception|Cannot describe error", re.IGNORECASE)
INTERNAL = re.compile(rb"internal", re.IGNORECASE)
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# ---------------------------------------------------------------- strategies

INTERESTING = [
    b"",
    b" ",
    b"\x00",
    b"\xff\xfe\xfd",
    b"\xc3\x28",  # invalid UTF-8 sequence
    b"\xed\xa0\x80",  # an encoded surrogate
    "è€😀".encode(),
    b"\r",
    b"\n",
    b"\r\n.\r\n",
    b".",
    b"<>",
    b"<@relay.example:u@h.example>",
    b"u%h.example@relay.example",
    b"h.example!u@relay.example",
    b"SIZE=99999999999",
    b"SIZE=abc",
    b"BODY=8BITMIME",
    b"SMTPUTF8",
    b"AUTH=<>",
    b"X" * 600,
    b"=?utf-8?b?w6g=?=",
    b"\t",
    b":",
    b"*",
]
atom = st.one_of(
    st.sampled_from(INTERESTING),
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.text(alphabet="abcxyz.@<>-_:=", max_size=30).map(str.encode),
)
domain = st.one_of(
    st.sampled_from([AUTH_DOMAIN, NET_DOMAIN, "other.example", "FUZZ-NET.EXAMPLE", ""]).map(
        str.encode
    ),
    atom,
)
address = st.one_of(
    st.builds(lambda local, dom: b"<" + local + b"@" + dom + b">", atom, domain),
    st.builds(lambda dom: b"<sender@" + dom + b">", domain),
    atom,
)
long_line = st.integers(990, 2100).map(lambda n: b"L" * n)


def line(verb: bytes, arg: bytes | None = None) -> bytes:
    return verb + (b" " + arg if arg is not None else b"") + b"\r\n"


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@st.composite
def payload(draw, from_domain: str = NET_DOMAIN) -> bytes:
    """A message as sent after 354, ending with the end-of-data dot line."""
    headers = [b"X-Fuzz-Dialog: " + MARKER]
    header_from = draw(
        st.one_of(
            st.sampled_from(
                [
                    f"From: Fuzz <sender@{NET_DOMAIN}>".encode(),
                    f"From: sender@{AUTH_DOMAIN}".encode(),
                    f"From: a@{NET_DOMAIN}, b@{NET_DOMAIN}".encode(),
                ]
            ),
            st.builds(lambda a: b"From: " + a, address),
            st.none(),
        )
    )
    wild = draw(st.booleans())
    printable = st.characters(blacklist_categories=("Cs", "Cc"))
    value = atom if wild else st.text(printable, max_size=40).map(str.encode)
    extra = draw(
        st.lists(
            st.one_of(
                st.builds(lambda a: b"Message-ID: " + a, value),
                st.builds(lambda a: b"Message-ID: <" + a + b"@fuzz.example>", value),
                st.builds(lambda a: b"X-Axiom-Stream: " + a, value),
                st.builds(lambda a: b"Date: " + a, value),
                st.builds(lambda a: b"Subject: " + a, value),
                st.builds(lambda a: b" folded " + a, value),
                st.just(b"DKIM-Signature: v=1; a=rsa-sha256; b=garbage"),
                atom if wild else st.just(b"X-Clean: yes"),
            ),
            max_size=5,
        )
    )
    headers += extra
    if draw(st.booleans()):
        header_from = f"From: Fuzz <sender@{from_domain}>".encode()
    if header_from is not None:
        headers.insert(draw(st.integers(0, len(headers))), header_from)
    body_line = st.one_of(value, st.builds(lambda a: b"." + a, value), st.just(b".."))
    if wild:
        body_line = st.one_of(atom, body_line, long_line)
    body = draw(st.lists(body_line, max_size=8))
    separator = b"\r\n\r\n"
    if wild:
        separator = draw(st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n"]))
    return b"\r\n".join(headers) + separator + b"\r\n".join(body) + b"\r\n.\r\n"


def _auth_plain(user: bytes, password: bytes) -> bytes:
    return line(b"AUTH PLAIN", _b64(b"\0" + user + b"\0" + password))


@st.composite
def step(draw, tenant: Tenant) -> bytes:
    user, password = tenant.username.encode(), tenant.password.encode()
    verb = draw(
        st.sampled_from(
            [
                *(b"EHLO", b"HELO", b"ehlo", b"MAIL FROM:", b"RCPT TO:", b"mail from:"),
                *(b"rcpt to:", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"EXPN", b"HELP"),
                *(b"BDAT", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"STARTTLS"),
                b"XYZZY",
            ]
        )
    )
    return draw(
        st.one_of(
            # well-formed moves that reach deep states
            st.just(line(b"EHLO", b"fuzz.example")),
            st.just(line(b"HELO", b"fuzz.example")),
            st.just(line(b"STARTTLS")),
            st.just(_auth_plain(user, password)),
            st.builds(lambda p: _auth_plain(user, p), atom),
            st.just(line(b"AUTH LOGIN", _b64(user))),
            st.just(line(_b64(password))),
            st.sampled_from([NET_DOMAIN, AUTH_DOMAIN, "other.example"]).map(
                lambda d: line(b"MAIL FROM:", f"<sender@{d}>".encode())
            ),
            st.builds(lambda a: line(b"MAIL FROM:", f"<sender@{NET_DOMAIN}> ".encode() + a), atom),
            st.integers(0, 3).map(lambda n: line(b"RCPT TO:", f"<r{n}@dest.example>".encode())),
            st.integers(200, 480).map(
                lambda n: line(b"RCPT TO:", b"<r@" + b"d" * n + b".example>")
            ),
            st.just(line(b"DATA")),
            payload(),
            # random verbs, random arguments
            st.builds(lambda a: line(verb, a), st.one_of(atom, address, long_line)),
            st.builds(lambda a: line(verb, _b64(a)), atom),
            st.just(line(verb)),
            # raw bytes: no line end, bare CR/LF, NUL, very long, non-UTF-8
            st.binary(min_size=1, max_size=200),
            st.builds(lambda a, b: a + b"\r\n" + b, atom, atom),
            long_line.map(lambda b: b + b"\r\n"),
            st.integers(1000, 70000).map(lambda n: b"A" * n + b"\r\n"),
            st.just(b"\r\n"),
        )
    )


@st.composite
def happy_path(draw, kind: str, tenant: Tenant) -> list[bytes]:
    """EHLO, (STARTTLS), (AUTH), MAIL, RCPT, DATA and a payload; arguments often hostile."""
    # 500 octets: a local part that fits the MAIL line but not a 512-octet address column
    hostile = st.one_of(atom, st.sampled_from([b"\x00", b"\xff", b"\t", b"x" * 500]))

    clean = draw(st.booleans())  # (hypothesis leans to boundary choices; keep half clean)

    def usually(good: bytes) -> bytes:
        return good if clean else draw(st.one_of(st.just(good), hostile))

    steps = [line(b"EHLO", usually(b"fuzz.example"))]
    if kind != "bound":
        if kind == "starttls":
            steps += [line(b"STARTTLS"), line(b"EHLO", b"fuzz.example")]
        steps.append(_auth_plain(tenant.username.encode(), tenant.password.encode()))
    from_domain = NET_DOMAIN if kind == "bound" else AUTH_DOMAIN
    sender = usually(b"sender") + b"@" + from_domain.encode()
    steps.append(line(b"MAIL FROM:", b"<" + sender + b">" + usually(b"")))
    for _ in range(draw(st.integers(1, 2))):
        steps.append(line(b"RCPT TO:", b"<" + usually(b"rcpt") + b"@dest.example>"))
    steps += [line(b"DATA"), draw(payload(from_domain))]
    return steps


@st.composite
def dialog(draw, tenant: Tenant) -> tuple[str, list[bytes], str]:
    kind = draw(st.sampled_from(["bound", "starttls", "implicit"]))
    if draw(st.booleans()) or draw(st.booleans()):
        # a mutated happy path: insertions, deletions and a payload at the end
        steps = draw(happy_path(kind, tenant))
        for _ in range(draw(st.integers(1, 3)) if draw(st.booleans()) else 0):
            if steps and draw(st.booleans()):
                del steps[draw(st.integers(0, len(steps) - 1))]
            else:
                steps.insert(draw(st.integers(0, len(steps))), draw(step(tenant)))
    else:
        steps = draw(st.lists(step(tenant), min_size=1, max_size=12))
    ending = draw(st.sampled_from(["quit", "close", "reset", "abandon"]))
    return kind, steps, ending


# ---------------------------------------------------------------- the wire


class Wire:
    """A raw socket that records every byte the relay sent."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = bytearray()
        self.closed = False

    def send(self, data: bytes) -> bool:
        if self.closed:
            return False
        try:
            self.sock.settimeout(5)
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def _recv(self, timeout: float) -> bool:
        """True if bytes arrived; False on silence or end of connection."""
        if self.closed:
            return False
        try:
            self.sock.settimeout(max(timeout, 0.001))
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return False
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        self.received += data
        return True

    def lines(self) -> list[bytes]:
        return bytes(self.received).split(b"\r\n")[:-1]

    def last_final_code(self) -> bytes | None:
        for ln in reversed(self.lines()):
            m = REPLY_LINE.match(ln)
            if m and ln[3:4] != b"-":
                return m.group(1)
        return None

    def await_final(self, since: int, timeout: float) -> bool:
        """Waits for a complete final reply line in the bytes received after offset `since`."""
        end = time.monotonic() + timeout
        while True:
            tail = bytes(self.received[since:])
            for ln in tail.split(b"\r\n")[:-1]:
                if REPLY_LINE.match(ln) and ln[3:4] != b"-":
                    return True
            remaining = end - time.monotonic()
            if self.closed or remaining <= 0:
                return False
            self._recv(remaining)

    def settle(self, quiet: float) -> None:
        while self._recv(quiet):
            pass


@dataclass
class Outcome:
    dialog_id: str
    transcript: bytes
    queued: list[str] = field(default_factory=list)
    abandoned: bool = False


def _connect(relay: RelayProcess, kind: str, tls: ssl.SSLContext) -> socket.socket:
    if kind == "bound":
        return socket.create_connection(
            relay.submission, timeout=5, source_address=(BOUND_SOURCE, 0)
        )
    if kind == "implicit":
        raw = socket.create_connection(relay.submission_tls, timeout=5)
        return tls.wrap_socket(raw, server_hostname="127.0.0.1")
    return socket.create_connection(relay.submission, timeout=5)


def _state(wire: Wire) -> str:
    code = wire.last_final_code()
    return {b"354": "data", b"334": "auth"}.get(code or b"", "command")


def run_dialog(
    relay: RelayProcess, tls: ssl.SSLContext, kind: str, steps: list[bytes], ending: str
) -> Outcome:
    dialog_id = secrets.token_hex(8)
    marker = dialog_id.encode()
    wire = Wire(_connect(relay, kind, tls))
    outcome = Outcome(dialog_id, b"")
    plain_part = b""
    try:
        assert wire.await_final(0, 5), "no greeting"
        for raw in steps:
            data = raw.replace(MARKER, marker)
            state, mark = _state(wire), len(wire.received)
            if not wire.send(data):
                break
            single_line = data.endswith(b"\r\n") and not re.search(rb"[\r\n]", data[:-2])
            is_payload = data.endswith(b"\r\n.\r\n")
            if (single_line and state != "data") or (is_payload and state == "data"):
                wire.await_final(mark, 5)
                wire.settle(0.005)
            else:
                wire.settle(0.03)
            if data == b"STARTTLS\r\n" and wire.last_final_code() == b"220" and kind != "implicit":
                plain_part += bytes(wire.received)
                wire.received.clear()
                try:
                    wire.sock = tls.wrap_socket(wire.sock, server_hostname="127.0.0.1")
                except (OSError, ssl.SSLError):
                    wire.closed = True
                    break
        if ending == "abandon":
            outcome.abandoned = True
        else:
            _synchronise(wire)
            if ending == "quit" and wire.send(b"QUIT\r\n"):
                end = time.monotonic() + 3
                while not wire.closed and time.monotonic() < end:
                    wire._recv(end - time.monotonic())
            elif ending == "reset" and not wire.closed:
                wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        wire.sock.close()
    outcome.transcript = plain_part + bytes(wire.received)
    for ln in outcome.transcript.split(b"\r\n"):
        m = QUEUED.match(ln)
        if m:
            outcome.queued.append(m.group(1).decode())
    return outcome


def _synchronise(wire: Wire) -> None:
    """Leaves the session in command state and makes sure every reply due has arrived.

    The relay handles a connection's lines in order, so once a NOOP sent last is answered,
    any DATA commit that was in flight has been answered too.
    """
    for _ in range(2):
        if wire.closed:
            return
        state = _state(wire)
        mark = len(wire.received)
        if state == "auth":
            wire.send(b"*\r\n")
        elif state == "data":
            wire.send(b"\r\n.\r\n")
        if state != "command":
            wire.await_final(mark, 5)
            mark = len(wire.received)
        if wire.send(b"NOOP\r\n") and wire.await_final(mark, 3):
            wire.settle(0.05)
            if _state(wire) == "command":
                return
    wire.settle(0.1)


# ---------------------------------------------------------------- checks


def check_transcript(transcript: bytes) -> None:
    complete, _, _partial = transcript.rpartition(b"\r\n")
    lines = complete.split(b"\r\n") if complete else []
    assert lines, "the relay sent nothing, not even a greeting"
    assert lines[0].startswith(b"220 "), f"greeting {lines[0]!r}"
    continuation: bytes | None = None
    for ln in lines:
        m = REPLY_LINE.match(ln)
        assert m, f"not an SMTP reply line: {ln[:200]!r}"
        # RFC 5321 textstring (+ UTF-8 under SMTPUTF8): client bytes echoed in a reply must not
        # smuggle control characters or invalid UTF-8 onto the wire
        assert not CONTROL.search(ln), f"control character inside a reply: {ln!r}"
        try:
            ln.decode("utf-8")
        except UnicodeDecodeError:
            raise AssertionError(f"reply is not valid UTF-8: {ln!r}") from None
        assert not LEAKS.search(ln), f"exception leaked to the client: {ln!r}"
        code = m.group(1)
        if code.startswith(b"5"):
            assert not INTERNAL.search(ln), f"internal error answered 5xx: {ln!r}"
        # The database is healthy throughout, so a 451 4.3.0 here can only mean the relay
        # turned bad input into a transient error the client would retry forever.
        assert not ln.startswith(b"451 4.3.0"), f"input caused an internal error: {ln!r}"
        if continuation is not None:
            assert code == continuation, f"multi-line reply changes code: {ln!r}"
        continuation = code if ln[3:4] == b"-" else None


class SpoolWatch:
    """Compares the spool with what clients were told, dialog by dialog."""

    def __init__(self, engine):
        self.engine = engine
        self.seen: set[str] = set()
        self.abandoned: set[bytes] = set()
        self.acked: dict[str, str] = {}  # queue id -> dialog id

    def record(self, outcome: Outcome) -> None:
        """What the client was told; recorded before any check can fail the example."""
        for qid in outcome.queued:
            self.acked[qid] = outcome.dialog_id
        if outcome.abandoned:
            self.abandoned.add(outcome.dialog_id.encode())

    def check(self, outcome: Outcome) -> None:
        with session_scope(self.engine) as s:
            ids = set(s.exec(select(Message.id)).scalars())
            new = ids - self.seen
            for qid in outcome.queued:
                assert qid in ids, f"told 'queued as {qid}' but it is not in the spool"
            for qid in new:
                message = s.get(Message, qid)
                rcpts = s.exec(
                    select(func.count()).select_from(Recipient).where(Recipient.message_id == qid)
                ).scalar_one()
                _assert_whole(message, rcpts)
                if qid in self.acked:
                    assert f"X-Fuzz-Dialog: {self.acked[qid]}".encode() in message.data
                else:
                    # stored without a 250 seen: only a client that hung up early may cause that
                    found = re.search(rb"X-Fuzz-Dialog: ([0-9a-f]{16})", message.data)
                    assert found and found.group(1) in self.abandoned, (
                        f"{qid} is in the spool but no client was told it was queued"
                    )
        self.seen |= new

    def check_all(self) -> int:
        with session_scope(self.engine) as s:
            messages = s.exec(select(Message)).scalars().all()
            for message in messages:
                rcpts = s.exec(
                    select(func.count())
                    .select_from(Recipient)
                    .where(Recipient.message_id == message.id)
                ).scalar_one()
                _assert_whole(message, rcpts)
            orphans = s.execute(
                select(func.count())
                .select_from(Recipient)
                .outerjoin(Message, Message.id == Recipient.message_id)
                .where(Message.id.is_(None))
            ).scalar_one()
        assert orphans == 0, f"{orphans} recipient rows point at no message"
        return len(messages)


def _assert_whole(message: Message, recipients: int) -> None:
    assert message.size == len(message.data), f"{message.id}: size differs from data"
    assert recipients >= 1, f"{message.id}: stored without recipients"
    assert message.data.startswith(b"DKIM-Signature:"), f"{message.id}: not signed"
    assert b"\r\n\r\n" in message.data, f"{message.id}: no header/body separator"
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", message.data), f"{message.id}: bare line end"


# ---------------------------------------------------------------- the test


def _seed(home: AxiomHome) -> tuple[Tenant, Tenant]:
    authed = seed_tenant(home, "fuzzauth", AUTH_DOMAIN)
    bound = seed_tenant(home, "fuzznet", NET_DOMAIN)
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            tenants.add_network(s, "fuzznet", f"{BOUND_SOURCE}/32")
            s.commit()
    finally:
        engine.dispose()
    return authed, bound


def _send_well_formed(relay: RelayProcess, tls: ssl.SSLContext, tenant: Tenant, bound: bool):
    sender = f"sender@{NET_DOMAIN if bound else tenant.domain}"
    msg = f"From: {sender}\r\nTo: r@dest.example\r\nSubject: after fuzz\r\n\r\nstill alive\r\n"
    source = (BOUND_SOURCE, 0) if bound else None
    with smtplib.SMTP(*relay.submission, timeout=10, source_address=source) as smtp:
        smtp.ehlo("fuzz.example")
        if not bound:
            smtp.starttls(context=tls)
            smtp.ehlo("fuzz.example")
            smtp.login(tenant.username, tenant.password)
        smtp.mail(sender)
        assert smtp.rcpt("r@dest.example")[0] == 250
        code, reply = smtp.data(msg.encode())
    assert code == 250, reply
    return QUEUED.match(b"250 " + reply).group(1).decode()


def test_fuzzed_dialogs_never_break_the_relay(axiom_home: AxiomHome) -> None:
    started = time.monotonic()
    authed, _bound = _seed(axiom_home)
    # Failed AUTHs are part of the fuzz; keep the lockout from shutting the door on the rest.
    # Delivery stays off: the spool must hold exactly what the submission side accepted.
    env = {"AXIOM_AUTH_MAX_FAILURES": "1000000", "AXIOM_DELIVERY_ENABLED": "false"}
    relay = RelayProcess(axiom_home, env).start()
    tls = ssl.create_default_context(cafile=str(axiom_home.path / "tls" / "cert.pem"))
    engine = make_engine(axiom_home.db_url)
    watch = SpoolWatch(engine)
    stats = {"dialogs": 0, "queued": 0}
    log_offset = [relay.log.stat().st_size]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(dialog(authed))
    def fuzz(case: tuple[str, list[bytes], str]) -> None:
        kind, steps, ending = case
        outcome = run_dialog(relay, tls, kind, steps, ending)
        watch.record(outcome)
        assert relay.proc.poll() is None, f"relay died:\n{relay.log.read_text()[-3000:]}"
        check_transcript(outcome.transcript)
        # Nothing a client sends is an internal error (the database is healthy throughout):
        # such a log entry means a traceback an operator would be paged for, or a bad count.
        with relay.log.open("rb") as logf:
            logf.seek(log_offset[0])
            logged = logf.read()
        log_offset[0] += len(logged)
        assert b"internal error" not in logged, logged.decode("utf-8", "replace")[-4000:]
        watch.check(outcome)
        stats["dialogs"] += 1
        stats["queued"] += len(outcome.queued)

    try:
        fuzz()
        assert relay.proc.poll() is None, "relay died"
        queued = [
            _send_well_formed(relay, tls, authed, bound=False),
            _send_well_formed(relay, tls, authed, bound=True),
        ]
        total = watch.check_all()
        with session_scope(engine) as s:
            for qid in queued:
                assert s.get(Message, qid) is not None, f"{qid} acknowledged but not spooled"
    finally:
        engine.dispose()
        relay.stop()
    elapsed = time.monotonic() - started
    print(f"fuzz ({axiom_home.db_url.split(':')[0]}): {stats}, spool {total}, {elapsed:.1f}s")
    assert elapsed < BUDGET_SECONDS * 2, f"fuzzing took {elapsed:.0f}s"
