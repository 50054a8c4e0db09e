"""Durability under kill -9: no message that got a 250 is lost, none is left half-stored.

Twenty clients submit mail continuously — half over STARTTLS + AUTH, half from a loopback
address bound to a tenant — while the relay is SIGKILLed and restarted several times. Each
message carries a unique X-Test-Seq marker and Message-ID. Afterwards the spool must hold
every acknowledged message whole (body, marker, DKIM signature, every recipient) and nothing
partial or unexplained.
"""

from __future__ import annotations

import random
import re
import smtplib
import ssl
import threading
import time
from dataclasses import dataclass, field

import pytest
from sqlalchemy import func, select

from axiom import admin
from models import Message, Recipient
from models.db import make_engine, session_scope
from tests.conftest import AxiomHome, RelayProcess, Tenant, seed_tenant

pytestmark = pytest.mark.integration

CLIENTS = 20
ROUNDS = 3
ROUND_MIN_ACKS = 15  # acknowledged messages in a round before the kill may fall
ROUND_MAX_SECONDS = 12.0  # bound on one round's traffic phase
TEST_BUDGET_SECONDS = 60.0  # hard bound on the whole load phase
BOUND_SOURCE = "127.0.0.2"  # network-bound tenant submits from here, without TLS or AUTH
QUEUED = re.compile(rb"queued as ([0-9A-Z]{26})")


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


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: list[Attempt] = field(default_factory=list)
    round: int = 0
    acks_by_round: dict[int, int] = field(default_factory=dict)
    # sessions that were established (EHLO done) and then died: the kill hit live traffic
    broken_sessions_by_round: dict[int, int] = field(default_factory=dict)
    refused_connects: int = 0
    rejected_replies: list[bytes] = field(default_factory=list)
    client_errors: list[str] = field(default_factory=list)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def ack(self) -> None:
        with self.lock:
            self.acks_by_round[self.round] = self.acks_by_round.get(self.round, 0) + 1

    def broken(self) -> None:
        with self.lock:
            self.broken_sessions_by_round[self.round] = (
                self.broken_sessions_by_round.get(self.round, 0) + 1
            )


def _compose(
    tenant: Tenant, seq: str, rng: random.Random
) -> tuple[str, list[str], str, bytes, bytes]:
    sender = f"sender@{tenant.domain}"
    recipients = [f"user{rng.randrange(10**6)}@rcpt{k}.example" for k in range(rng.randint(1, 3))]
    message_id = f"<{seq}.{rng.getrandbits(64):016x}@{tenant.domain}>"
    lines = [f"crash-test body for {seq}".encode()]
    for n in range(rng.randint(1, 400)):
        # leading dots exercise dot-stuffing; line lengths vary up to a few hundred octets
        prefix = b"." if n % 17 == 0 else b""
        lines.append(prefix + f"{seq} line {n} ".encode() + b"x" * rng.randint(0, 300))
    body = b"\r\n".join(lines) + b"\r\n"
    head = (
        f"From: Crash Test <{sender}>\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: crash {seq}\r\n"
        f"Message-ID: {message_id}\r\n"
        f"X-Test-Seq: {seq}\r\n"
    ).encode()
    return sender, recipients, message_id, body, head + b"\r\n" + body


def _client(
    idx: int,
    kind: str,
    tenant: Tenant,
    relay: RelayProcess,
    tls: ssl.SSLContext,
    ledger: Ledger,
    stop: threading.Event,
    deadline: float,
) -> None:
    rng = random.Random(idx * 7919 + int(time.time()))
    seq_no = 0
    host, port = relay.submission
    source = (BOUND_SOURCE, 0) if kind == "bound" else None
    while not stop.is_set() and time.monotonic() < deadline:
        smtp: smtplib.SMTP | None = None
        established = False
        attempt: Attempt | None = None
        try:
            smtp = smtplib.SMTP(host, port, timeout=10, source_address=source)
            smtp.ehlo("crash-client.example")
            if kind == "auth":
                smtp.starttls(context=tls)
                smtp.ehlo("crash-client.example")
                smtp.login(tenant.username, tenant.password)
            established = True
            for _ in range(rng.randint(1, 5)):
                if stop.is_set():
                    break
                seq_no += 1
                seq = f"c{idx:02d}-{seq_no:05d}"
                sender, rcpts, msgid, body, raw = _compose(tenant, seq, rng)
                code, reply = smtp.mail(sender)
                if code != 250:
                    ledger.rejected_replies.append(reply)
                    smtp.rset()
                    continue
                refused = False
                for rcpt in rcpts:
                    code, reply = smtp.rcpt(rcpt)
                    if code != 250:
                        ledger.rejected_replies.append(reply)
                        refused = True
                        break
                if refused:
                    smtp.rset()
                    continue
                attempt = Attempt(seq, tenant.name, sender, rcpts, msgid, body, raw)
                ledger.add(attempt)
                code, reply = smtp.data(raw)
                attempt.reply = reply
                if code == 250:
                    match = QUEUED.search(reply)
                    assert match, f"250 without a queue id: {reply!r}"
                    attempt.queue_id = match.group(1).decode()
                    attempt.outcome = "queued"
                    ledger.ack()
                else:
                    attempt.outcome = "refused"
                    ledger.rejected_replies.append(reply)
                attempt = None
            smtp.quit()
        except (smtplib.SMTPException, OSError) as exc:
            if attempt is not None:
                attempt.outcome = "unknown"  # DATA sent, no reply: may or may not be stored
            if established:
                ledger.broken()
            elif isinstance(exc, ConnectionRefusedError):
                with ledger.lock:
                    ledger.refused_connects += 1
            else:
                ledger.broken()  # the kill fell during the greeting, TLS or AUTH
            time.sleep(0.02 + rng.random() * 0.05)
        except Exception as exc:  # an assertion or a bug in this client: report it
            ledger.client_errors.append(f"{kind}-{idx}: {exc!r}")
            return
        finally:
            if smtp is not None:
                smtp.close()


def _seed(home: AxiomHome) -> tuple[Tenant, Tenant]:
    authed = seed_tenant(home, "crashauth", "crash-auth.example")
    bound = seed_tenant(home, "crashnet", "crash-net.example")
    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            admin.add_network(s, "crashnet", f"{BOUND_SOURCE}/32")
            s.commit()
    finally:
        engine.dispose()
    return authed, bound


def _wait_for_acks(ledger: Ledger, round_no: int, minimum: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ledger.acks_by_round.get(round_no, 0) >= minimum:
            break
        time.sleep(0.02)
    return ledger.acks_by_round.get(round_no, 0)


def _assert_spool_consistent(engine, ledger: Ledger) -> dict[str, int]:
    """The spool holds every acknowledged message whole, and nothing partial or unexplained."""
    by_seq = {a.seq: a for a in ledger.attempts}
    seq_header = re.compile(rb"^X-Test-Seq: (\S+)\r$", re.MULTILINE)
    with session_scope(engine) as s:
        messages = {m.id: m for m in s.exec(select(Message)).scalars()}
        recipients: dict[str, list[str]] = {}
        for r in s.exec(select(Recipient)).scalars():
            recipients.setdefault(r.message_id, []).append(r.address)
        orphans = s.execute(
            select(func.count())
            .select_from(Recipient)
            .outerjoin(Message, Message.id == Recipient.message_id)
            .where(Message.id.is_(None))
        ).scalar_one()

    assert orphans == 0, f"{orphans} recipient rows point at no message"
    assert set(recipients) <= set(messages), "recipient rows for messages that do not exist"

    # Nothing partial, nothing unexplained.
    for qid, message in messages.items():
        assert message.size == len(message.data), f"{qid}: size {message.size} != data length"
        assert recipients.get(qid), f"{qid}: a message without recipients"
        found = seq_header.search(message.data)
        assert found, f"{qid}: spooled message carries no X-Test-Seq marker"
        attempt = by_seq.get(found.group(1).decode())
        assert attempt is not None, f"{qid}: spooled message was never sent"
        assert attempt.outcome in ("queued", "unknown"), (
            f"{qid}: stored although the client was told {attempt.reply!r}"
        )
        if attempt.outcome == "queued":
            assert attempt.queue_id == qid, f"{attempt.seq} acknowledged as {attempt.queue_id}"

    # Every acknowledged message is there, whole.
    acked = [a for a in ledger.attempts if a.outcome == "queued"]
    for a in acked:
        message = messages.get(a.queue_id)
        assert message is not None, f"{a.seq} got 250 as {a.queue_id} but is not in the spool"
        head, sep, body = message.data.partition(b"\r\n\r\n")
        assert sep, f"{a.seq}: stored data has no header/body separator"
        assert body == a.body, f"{a.seq}: stored body differs from the body sent"
        assert head.startswith(b"DKIM-Signature:"), f"{a.seq}: not DKIM-signed"
        assert f"\r\nX-Test-Seq: {a.seq}\r\n".encode() in head + b"\r\n"
        assert f"\r\nMessage-ID: {a.message_id}\r\n".encode() in head + b"\r\n"
        assert message.message_id_header == a.message_id
        assert message.mail_from == a.mail_from
        assert sorted(recipients[a.queue_id]) == sorted(a.recipients), f"{a.seq}: recipients"

    unknown = [a for a in ledger.attempts if a.outcome == "unknown"]
    return {
        "acked": len(acked),
        "unknown": len(unknown),
        "unknown_stored": sum(
            1 for a in unknown if any(a.seq.encode() in m.data for m in messages.values())
        ),
        "spooled": len(messages),
    }


def test_acknowledged_mail_survives_kill9(axiom_home: AxiomHome) -> None:
    started = time.monotonic()
    authed, bound = _seed(axiom_home)
    # Delivery stays off: the spool must hold exactly what the submission side accepted.
    relay = RelayProcess(axiom_home, {"AXIOM_DELIVERY_ENABLED": "false"})
    tls = ssl.create_default_context(cafile=str(axiom_home.path / "tls" / "cert.pem"))
    ledger = Ledger()
    stop = threading.Event()
    deadline = time.monotonic() + TEST_BUDGET_SECONDS
    rng = random.Random()

    relay.start()
    ledger.round = 1
    kinds = [("auth", authed), ("bound", bound)]  # half STARTTLS + AUTH, half network-bound
    threads = [
        threading.Thread(
            target=_client,
            args=(i, *kinds[i % 2], relay, tls, ledger, stop, deadline),
            name=f"crash-client-{i}",
            daemon=True,
        )
        for i in range(CLIENTS)
    ]
    try:
        for t in threads:
            t.start()
        for round_no in range(1, ROUNDS + 1):
            if round_no > 1:
                time.sleep(rng.uniform(0.1, 0.5))  # clients meet a dead port for a while
                with ledger.lock:
                    ledger.round = round_no
                relay.start()
            acks = _wait_for_acks(ledger, round_no, ROUND_MIN_ACKS, ROUND_MAX_SECONDS)
            assert acks >= ROUND_MIN_ACKS, (
                f"round {round_no}: only {acks} messages acknowledged after restart;"
                f" client errors {ledger.client_errors[:3]}; rejected {ledger.rejected_replies[:3]}"
            )
            time.sleep(rng.uniform(0.05, 0.8))  # the kill falls at a random point in traffic
            relay.kill9()
            time.sleep(0.3)  # let the clients notice the dead sessions in this round
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        relay.stop()
    assert not any(t.is_alive() for t in threads), "a client thread did not finish"
    assert not ledger.client_errors, ledger.client_errors

    # The relay comes back after the last crash and takes mail again.
    relay.start()
    try:
        final_rng = random.Random()
        sender, rcpts, msgid, body, raw = _compose(bound, "final-00001", final_rng)
        final = Attempt("final-00001", bound.name, sender, rcpts, msgid, body, raw)
        ledger.add(final)
        with smtplib.SMTP(*relay.submission, timeout=10, source_address=(BOUND_SOURCE, 0)) as s:
            s.ehlo("crash-client.example")
            s.mail(sender)
            for r in rcpts:
                assert s.rcpt(r)[0] == 250
            code, reply = s.data(raw)
        assert code == 250, reply
        final.outcome, final.queue_id = "queued", QUEUED.search(reply).group(1).decode()
    finally:
        assert relay.stop() == 0, "relay did not stop cleanly after recovery"

    # The kill really fell on live traffic in every round: sessions broke mid-dialog.
    for round_no in range(1, ROUNDS + 1):
        assert ledger.broken_sessions_by_round.get(round_no, 0) > 0, (
            f"round {round_no}: no session was cut by the kill; the test proved nothing"
        )

    engine = make_engine(axiom_home.db_url)
    try:
        stats = _assert_spool_consistent(engine, ledger)
    finally:
        engine.dispose()
    assert stats["acked"] >= ROUNDS * ROUND_MIN_ACKS
    print(
        f"crash test ({axiom_home.db_url.split(':')[0]}): {stats}, broken sessions"
        f" {ledger.broken_sessions_by_round}, refused connects {ledger.refused_connects},"
        f" {time.monotonic() - started:.1f}s"
    )
