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

import pytest
from sqlalchemy import func, select

from models import Message, Recipient
from models.db import make_engine, session_scope
from testbed.axiom import AxiomHome, RelayProcess
from testbed.submitters import (
    QUEUED,
    Attempt,
    Ledger,
    compose,
    seed_clients,
    start_clients,
    wait_for_acks,
)

pytestmark = pytest.mark.integration

CLIENTS = 20
ROUNDS = 3
ROUND_MIN_ACKS = 15  # acknowledged messages in a round before the kill may fall
ROUND_MAX_SECONDS = 12.0  # bound on one round's traffic phase
TEST_BUDGET_SECONDS = 60.0  # hard bound on the whole load phase
BOUND_SOURCE = "127.0.0.2"  # network-bound tenant submits from here, without TLS or AUTH


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
    authed, bound = seed_clients(axiom_home, "crash", BOUND_SOURCE)
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
    threads: list[threading.Thread] = []
    try:
        threads = start_clients(
            CLIENTS,
            kinds,
            relay.submission,
            tls,
            ledger,
            stop,
            deadline,
            bound_source=BOUND_SOURCE,
            prefix="c",
        )
        for round_no in range(1, ROUNDS + 1):
            if round_no > 1:
                time.sleep(rng.uniform(0.1, 0.5))  # clients meet a dead port for a while
                with ledger.lock:
                    ledger.round = round_no
                relay.start()
            acks = wait_for_acks(ledger, round_no, ROUND_MIN_ACKS, ROUND_MAX_SECONDS)
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
        sender, rcpts, msgid, body, raw = compose(bound, "final-00001", final_rng)
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
