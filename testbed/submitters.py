"""Customers as peers: concurrent SMTP submission clients that keep a ledger of every message.

Each message carries a unique X-Test-Seq marker and Message-ID, so what a spool holds or a
receiver got can be traced back to the attempt that sent it and to the reply that attempt got.
A client submits until told to stop, until its deadline, or until the ledger's budget of
messages is spent (every load loop is bounded in count and time). Used by the kill -9
durability test and by the fault matrix (testbed/faults.py).

Outcomes: "queued" (250 with a queue id), "refused" (the server answered DATA, or the DATA
command, with anything else), "unknown" (DATA was sent and no reply came: the connection died;
the message may or may not be stored).
"""

from __future__ import annotations

import random
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

QUEUED = re.compile(rb"queued as ([0-9A-Z]{26})")
SEQ_HEADER = re.compile(rb"^X-Test-Seq: (\S+)\r?$", re.MULTILINE)
DEFAULT_DOMAINS = ("rcpt0.example", "rcpt1.example", "rcpt2.example")


@dataclass
class Attempt:
    """One message whose DATA was sent; outcome filled in when the reply (or failure) arrived."""

    seq: str
    tenant: str
    mail_from: str
    recipients: list[str]
    message_id: str
    body: bytes
    raw: bytes
    outcome: str = "pending"  # queued | refused | unknown
    queue_id: str | None = None
    reply: bytes = b""
    code: int | None = None
    data_sent_at: float = 0.0  # time.monotonic() when DATA went out
    replied_at: float = 0.0  # time.monotonic() when the final reply (or the failure) came


@dataclass(frozen=True)
class Rejection:
    """A reply other than 2xx/3xx at any stage of a session (greeting, AUTH, MAIL, RCPT, DATA)."""

    stage: str
    code: int
    text: bytes
    at: float  # time.monotonic()


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: list[Attempt] = field(default_factory=list)
    budget: int | None = None  # at most this many messages in all, then the clients stop
    round: int = 0
    acks_by_round: dict[int, int] = field(default_factory=dict)
    # sessions that were established (EHLO done) and then died: the kill hit live traffic
    broken_sessions_by_round: dict[int, int] = field(default_factory=dict)
    refused_connects: int = 0
    rejected_replies: list[Rejection] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)

    def add(self, attempt: Attempt) -> bool:
        """Record a message about to be sent; False when the budget is spent."""
        with self.lock:
            if self.budget is not None and len(self.attempts) >= self.budget:
                return False
            self.attempts.append(attempt)
            return True

    @property
    def spent(self) -> bool:
        return self.budget is not None and len(self.attempts) >= self.budget

    def ack(self) -> None:
        with self.lock:
            self.acks_by_round[self.round] = self.acks_by_round.get(self.round, 0) + 1

    def broken(self) -> None:
        with self.lock:
            self.broken_sessions_by_round[self.round] = (
                self.broken_sessions_by_round.get(self.round, 0) + 1
            )

    def reject(self, stage: str, code: int, text: bytes | str) -> None:
        raw = text.encode() if isinstance(text, str) else text
        with self.lock:
            self.rejected_replies.append(Rejection(stage, code, raw, time.monotonic()))

    def acked(self) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.outcome == "queued"]

    def by_outcome(self, outcome: str) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.outcome == outcome]


def compose(
    tenant,
    seq: str,
    rng: random.Random,
    *,
    domains: Sequence[str] = DEFAULT_DOMAINS,
    max_recipients: int = 3,
    max_lines: int = 400,
) -> tuple[str, list[str], str, bytes, bytes]:
    """(sender, recipients, Message-ID, body, whole message) for one test message."""
    sender = f"sender@{tenant.domain}"
    targets = rng.sample(list(domains), len(domains))  # spread over the domains, none twice
    recipients = [
        f"user{rng.randrange(10**6)}-{k}@{targets[k % len(targets)]}"
        for k in range(rng.randint(1, max_recipients))
    ]
    message_id = f"<{seq}.{rng.getrandbits(64):016x}@{tenant.domain}>"
    lines = [f"test body for {seq}".encode()]
    for n in range(rng.randint(1, max_lines)):
        # leading dots exercise dot-stuffing; line lengths vary up to a few hundred octets
        prefix = b"." if n % 17 == 0 else b""
        lines.append(prefix + f"{seq} line {n} ".encode() + b"x" * rng.randint(0, 300))
    body = b"\r\n".join(lines) + b"\r\n"
    head = (
        f"From: Test Sender <{sender}>\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: test {seq}\r\n"
        f"Message-ID: {message_id}\r\n"
        f"X-Test-Seq: {seq}\r\n"
    ).encode()
    return sender, recipients, message_id, body, head + b"\r\n" + body


def submission_client(
    idx: int,
    kind: str,
    tenant,
    address: tuple[str, int],
    tls: ssl.SSLContext | None,
    ledger: Ledger,
    stop: threading.Event,
    deadline: float,
    *,
    bound_source: str = "127.0.0.2",
    domains: Sequence[str] = DEFAULT_DOMAINS,
    max_lines: int = 400,
    per_session: tuple[int, int] = (1, 5),
    prefix: str = "c",
    pause: float = 0.0,
) -> None:
    """Submit messages until stop, deadline or the ledger's budget. kind "auth": STARTTLS and
    AUTH as tenant; kind "bound": no TLS, no AUTH, from bound_source (a network bound to the
    tenant). A new session after every few messages, and after every broken one."""
    rng = random.Random(idx * 7919 + time.time_ns())
    seq_no = 0
    host, port = address
    source = (bound_source, 0) if kind == "bound" else None
    while not stop.is_set() and time.monotonic() < deadline and not ledger.spent:
        smtp: smtplib.SMTP | None = None
        established = False
        attempt: Attempt | None = None
        stage = "connect"
        try:
            smtp = smtplib.SMTP(host, port, timeout=10, source_address=source)
            stage = "ehlo"
            smtp.ehlo("test-client.example")
            if kind == "auth":
                stage = "starttls"
                smtp.starttls(context=tls)
                smtp.ehlo("test-client.example")
                stage = "auth"
                smtp.login(tenant.username, tenant.password)
            established = True
            for _ in range(rng.randint(*per_session)):
                if stop.is_set() or time.monotonic() >= deadline:
                    break
                seq_no += 1
                seq = f"{prefix}{idx:02d}-{seq_no:05d}"
                sender, rcpts, msgid, body, raw = compose(
                    tenant, seq, rng, domains=domains, max_lines=max_lines
                )
                stage = "mail"
                code, reply = smtp.mail(sender)
                if code != 250:
                    ledger.reject(stage, code, reply)
                    smtp.rset()
                    continue
                refused = False
                stage = "rcpt"
                for rcpt in rcpts:
                    code, reply = smtp.rcpt(rcpt)
                    if code != 250:
                        ledger.reject(stage, code, reply)
                        refused = True
                        break
                if refused:
                    smtp.rset()
                    continue
                attempt = Attempt(seq, tenant.name, sender, rcpts, msgid, body, raw)
                if not ledger.add(attempt):
                    attempt = None
                    break
                stage = "data"
                attempt.data_sent_at = time.monotonic()
                code, reply = smtp.data(raw)
                attempt.replied_at = time.monotonic()
                attempt.reply, attempt.code = reply, code
                if code == 250:
                    match = QUEUED.search(reply)
                    assert match, f"250 without a queue id: {reply!r}"
                    attempt.queue_id = match.group(1).decode()
                    attempt.outcome = "queued"
                    ledger.ack()
                else:
                    attempt.outcome = "refused"
                    ledger.reject(stage, code, reply)
                attempt = None
                if pause:
                    time.sleep(pause)
            smtp.quit()
        except smtplib.SMTPResponseException as exc:
            # The server answered (greeting, STARTTLS, AUTH or the DATA command) with a refusal.
            ledger.reject(stage, exc.smtp_code, exc.smtp_error)
            if attempt is not None:
                attempt.replied_at = time.monotonic()
                attempt.reply, attempt.code = exc.smtp_error, exc.smtp_code
                attempt.outcome = "refused"
            time.sleep(0.02 + rng.random() * 0.05)
        except (smtplib.SMTPException, OSError) as exc:
            if attempt is not None:
                attempt.replied_at = time.monotonic()
                attempt.outcome = "unknown"  # DATA sent, no reply: may or may not be stored
            if established:
                ledger.broken()
            elif isinstance(exc, ConnectionRefusedError):
                with ledger.lock:
                    ledger.refused_connects += 1
            else:
                ledger.broken()  # the connection died during the greeting, TLS or AUTH
            time.sleep(0.02 + rng.random() * 0.05)
        except Exception as exc:  # an assertion or a bug in this client: report it
            ledger.client_errors.append(f"{kind}-{idx}: {exc!r}")
            return
        finally:
            if smtp is not None:
                smtp.close()


def start_clients(
    count: int,
    kinds: Sequence[tuple[str, object]],
    address: tuple[str, int],
    tls: ssl.SSLContext | None,
    ledger: Ledger,
    stop: threading.Event,
    deadline: float,
    **options,
) -> list[threading.Thread]:
    """count client threads, kinds[i % len(kinds)] = (kind, tenant) for client i; started."""
    threads = [
        threading.Thread(
            target=submission_client,
            args=(i, *kinds[i % len(kinds)], address, tls, ledger, stop, deadline),
            kwargs=options,
            name=f"submission-client-{i}",
            daemon=True,
        )
        for i in range(count)
    ]
    for t in threads:
        t.start()
    return threads


def seed_clients(home, prefix: str, bound_source: str = "127.0.0.2"):
    """Two tenants for submission clients: PREFIXauth (domain PREFIX-auth.example) submits with
    STARTTLS + AUTH, PREFIXnet (PREFIX-net.example) from bound_source without either."""
    from models.db import make_engine, session_scope
    from protocol import tenants
    from testbed.axiom import seed_tenant

    authed = seed_tenant(home, f"{prefix}auth", f"{prefix}-auth.example")
    bound = seed_tenant(home, f"{prefix}net", f"{prefix}-net.example")
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            tenants.add_network(s, bound.name, f"{bound_source}/32")
            s.commit()
    finally:
        engine.dispose()
    return authed, bound


def wait_for_acks(ledger: Ledger, round_no: int, minimum: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ledger.acks_by_round.get(round_no, 0) >= minimum:
            break
        time.sleep(0.02)
    return ledger.acks_by_round.get(round_no, 0)
