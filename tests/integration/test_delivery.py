"""The delivery engine against real peers on loopback: Knot DNS, smtp-sink receivers."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlmodel import Session

from models import AuditEntry, Message, RecipientState, Suppression, Suspension
from testbed.dns import knot  # noqa: F401  (fixture)
from tests.integration.delivery_world import make_world

pytestmark = pytest.mark.integration


@pytest.fixture
def world(engine, knot):  # noqa: F811
    w = make_world(engine, knot)
    yield w
    w.stop()


def test_delivers_from_a_pool_ip_with_its_ptr_name_and_records_the_event(world):
    sink = world.sink("gmail.com")
    qid = world.submit(["ann@gmail.com", "bob@gmail.com"])
    world.run()
    rcpts = world.recipients(qid)
    assert [r.state for r in rcpts] == [RecipientState.delivered] * 2
    [captured] = sink.messages()  # one transaction, two recipients
    assert b"X-Rcpt-Args: <ann@gmail.com>" in captured or b"ann@gmail.com" in captured
    client = next(line for line in captured.split(b"\n") if line.startswith(b"X-Client-Addr:"))
    source = client.split(b":", 1)[1].strip().decode()
    assert source in ("127.0.0.10", "127.0.0.11")
    helo = next(line for line in captured.split(b"\n") if line.startswith(b"X-Helo-Args:"))
    assert helo.split(b":", 1)[1].strip().decode() == f"mta{source.rsplit('.', 1)[1]}.axiom.test"
    events = world.events()
    assert len(events) == 2
    assert {(e.category, e.provider, e.source_ip, e.mx_host, e.reply_code) for e in events} == {
        ("delivered", "google", source, "gmail-smtp-in.l.google.com", 250)
    }


def test_transient_failure_retries_then_succeeds(world):
    world.sink("example.org", ["-r", "RCPT", "-b", "451 4.3.0 Try again later"])
    qid = world.submit(["carol@example.org"])
    world.run()
    [r] = world.recipients(qid)
    assert r.state == RecipientState.queued and r.attempts == 1
    assert r.last_reply.startswith("451 4.3.0")
    wait = (
        r.next_attempt_at.replace(tzinfo=None) - world.clock.now().replace(tzinfo=None)
    ).total_seconds()
    assert 240 <= wait <= 360  # 5 minutes ± 20 % jitter
    world.run()  # not due yet: nothing happens
    assert world.recipients(qid)[0].attempts == 1
    sink = world.sink("example.org")  # the receiver recovers
    world.clock.advance(400)
    world.run()
    [r] = world.recipients(qid)
    assert r.state == RecipientState.delivered and r.attempts == 2
    assert len(sink.messages()) == 1
    assert [e.category for e in world.events()] == ["transient", "delivered"]


def test_unknown_mailbox_bounces_with_dsn_and_suppression(world):
    world.sink(
        "unknown-users.test",
        [
            "-f",
            "RCPT",
            "-B",
            "550 5.1.1 <dave@unknown-users.test>: Recipient address rejected: User unknown",
        ],
    )
    example = world.sink("example.org")  # where acme.example's DSN would go if it were routed
    qid = world.submit(["dave@unknown-users.test"])
    world.run(rounds=1)
    [r] = world.recipients(qid)
    assert r.state == RecipientState.bounced
    [event] = world.events()
    assert (event.category, event.permanent, event.enhanced_code) == (
        "mailbox_unknown",
        True,
        "5.1.1",
    )
    with Session(world.engine) as s:
        suppressed = s.exec(select(Suppression)).scalars().all()
        dsn = s.exec(select(Message).where(Message.mail_from == "")).scalars().one()
        audit = (
            s.exec(select(AuditEntry).where(AuditEntry.action == "suppression.add")).scalars().all()
        )
    assert [(x.address, x.source) for x in suppressed] == [("dave@unknown-users.test", "bounce")]
    assert len(audit) == 1
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn.data
    assert b"Final-Recipient: rfc822; dave@unknown-users.test" in dsn.data
    assert b"Status: 5.1.1" in dsn.data and b"Action: failed" in dsn.data
    [dsn_rcpt] = world.recipients(dsn.id)
    assert dsn_rcpt.address == "shop@acme.example"
    assert example.messages() == []


def test_null_mx_is_permanent(world):
    qid = world.submit(["eve@nullmx.test"])
    world.run(rounds=1)
    [r] = world.recipients(qid)
    assert r.state == RecipientState.bounced
    [event] = world.events()
    assert event.category == "bad_domain" and event.permanent
    assert "5.1.10" in (event.enhanced_code or "") + (event.reply_text or "")


def test_dns_failure_defers_and_mail_goes_out_when_dns_returns(world):
    world.sink("gmail.com")
    world.knot.servfail("gmail.com")
    qid = world.submit(["fred@gmail.com"])
    world.run(rounds=1)
    [r] = world.recipients(qid)
    assert r.state == RecipientState.queued and r.attempts == 1
    assert not world.events()[0].permanent
    world.knot.set_zone("gmail.com", [("@", "MX", "10 gmail-smtp-in.l.google.com.")])
    world.delivery.resolver.forget()
    world.clock.advance(400)
    world.run()
    assert world.recipients(qid)[0].state == RecipientState.delivered


def test_expiry_after_max_age_sends_a_dsn(world):
    world.sink("deferring.test", ["-r", "RCPT"])
    qid = world.submit(["gina@deferring.test"])
    world.run(rounds=1)
    world.clock.advance(5 * 86400 + 60)
    world.run(rounds=1)
    [r] = world.recipients(qid)
    assert r.state == RecipientState.expired
    with Session(world.engine) as s:
        dsn = s.exec(select(Message).where(Message.mail_from == "")).scalars().one()
    assert b"Status: 4.4.7" in dsn.data


def test_suspended_ip_is_skipped(world):
    sink = world.sink("gmail.com")
    with Session(world.engine) as s:
        s.add(
            Suspension(
                source_ip="127.0.0.10",
                provider="google",
                action="suspend",
                reason="test",
                created_at=world.clock.now(),
                expires_at=world.clock.now() + timedelta(hours=1),
            )
        )
        s.commit()
    for i in range(6):
        world.submit([f"user{i}@gmail.com"])
    world.run()
    sources = {e.source_ip for e in world.events()}
    assert sources == {"127.0.0.11"}
    assert len(sink.messages()) == 6


def test_421_storm_suspends_only_that_path(world):
    # Gmail answers the unusual-rate deferral; Yahoo keeps accepting.
    world.sink(
        "gmail.com",
        [
            "-r",
            "RCPT",
            "-b",
            "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address",
        ],
    )
    yahoo = world.sink("yahoo.com")
    for i in range(4):
        world.submit([f"g{i}@gmail.com"])
        world.submit([f"y{i}@yahoo.com"])
    world.run()
    with Session(world.engine) as s:
        suspensions = s.exec(select(Suspension)).scalars().all()
    assert {(x.provider, x.rule_id, x.action) for x in suspensions} <= {
        ("google", "google-unusual-rate", "suspend")
    }
    assert suspensions and all(x.provider == "google" for x in suspensions)
    assert len(yahoo.messages()) == 4
    # While suspended, Gmail mail waits without an attempt being spent on it.
    world.clock.advance(400)
    before = len(world.events())
    world.run()
    google_events = [e for e in world.events()[before:] if e.provider == "google"]
    suspended_ips = {x.source_ip for x in suspensions}
    assert all(e.source_ip not in suspended_ips for e in google_events)


def test_receivers_get_mail_rcpt_and_data_as_one_pipelined_group(world):
    """smtp-sink advertises PIPELINING; with -W MAIL:1 it delays MAIL's reply by a second. A
    command-by-command client just waits that second. Given a pipelined group, smtp-sink (its
    delayed replies are not pipelining-safe) answers RCPT '503 need MAIL' before MAIL: that
    503 is our evidence the group went out in one write. The relay must not read it as a
    verdict on the recipient, and must retry this receiver command by command."""
    world.sink("example.org", ["-W", "MAIL:1"])
    qid = world.submit(["erin@example.org"])
    world.run()
    [r] = world.recipients(qid)
    # never a bounce: a 503 that contradicts the group says nothing about the recipient
    assert r.state == RecipientState.queued and r.attempts == 1, r.last_reply
    assert "pipelined replies out of sequence: " in r.last_reply
    assert "503 5.5.1" in r.last_reply
    assert world.events()[-1].category == "transient"
    world.clock.advance(400)
    world.run()  # the same engine: it remembers this receiver's pipelining is broken
    [r] = world.recipients(qid)
    assert r.state == RecipientState.delivered and r.attempts == 2
    assert len(world.sinks["example.org"].messages()) == 1
