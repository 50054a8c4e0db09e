"""A customer's own Postfix, set up the way customers set up a smarthost (relayhost, SASL
password map, mandatory TLS), relays through Axiom: the message must end in the spool,
signed with both keys, with the customer's Received header intact."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from email.utils import make_msgid

import dkim
import pytest

from testbed import PostfixInstance, customer_mta
from tests.conftest import AxiomHome, RelayProcess, Tenant, seed_tenant
from tests.integration.test_swaks import dkim_dns, spool_count, spooled

pytestmark = pytest.mark.integration

CUSTOMER_HOST = "mail.acme.test"


@pytest.fixture
def tenant(axiom_home) -> Tenant:
    return seed_tenant(axiom_home, "acme", "acme.test")


def start_customer(
    relay: RelayProcess, username: str, password: str, **main_cf: object
) -> PostfixInstance:
    return customer_mta(
        relay.submission[1],
        username,
        password,
        name="customer",
        hostname=CUSTOMER_HOST,
        main_cf=main_cf,
    ).start()


@pytest.fixture
def customer(relay, tenant) -> Iterator[PostfixInstance]:
    instance = start_customer(relay, tenant.username, tenant.password)
    try:
        yield instance
    finally:
        instance.stop()


def invoice(message_id: str) -> str:
    return (
        "From: Ufficio Fatture <billing@acme.test>\r\n"
        "To: Alice <alice@example.org>, bob@example.net\r\n"
        "Subject: Fattura 2024-17\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Gentile cliente,\r\n"
        "in allegato la fattura.\r\n"
    )


def relayed_queue_id(customer: PostfixInstance, postfix_id: str, recipient: str) -> str:
    """Axiom's queue id, from the customer's log line for the accepted delivery (bounded)."""
    match = customer.wait_for_log(
        rf"{postfix_id}: to=<{re.escape(recipient)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+,"
        rf".* status=sent \(250 2\.0\.0 Ok: queued as ([0-9A-Z]{{26}})\)",
        timeout=30,
    )
    return match.group(1)


def wait_spooled(home: AxiomHome, queue_id: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        message, recipients = spooled(home, queue_id)
        if message is not None or time.monotonic() >= deadline:
            return message, recipients
        time.sleep(0.1)


def test_customer_postfix_relays_through_axiom(relay, axiom_home, tenant, customer):
    message_id = make_msgid(domain="acme.test")
    postfix_id = customer.submit(
        "billing@acme.test", ["alice@example.org", "bob@example.net"], invoice(message_id)
    )

    queue_id = relayed_queue_id(customer, postfix_id, "alice@example.org")
    # One SMTP transaction carried both recipients: same Axiom queue id for both.
    assert relayed_queue_id(customer, postfix_id, "bob@example.net") == queue_id
    log = customer.log()
    assert re.search(r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]", log), log
    customer.wait_until_queue_empty(timeout=10)

    message, recipients = wait_spooled(axiom_home, queue_id)
    assert message is not None, f"{queue_id} acknowledged to Postfix but not in the spool"
    assert message.mail_from == "billing@acme.test"
    assert message.auth_user == tenant.username
    assert message.header_from_domain == "acme.test"
    assert message.message_id_header == message_id
    assert sorted(r.address for r in recipients) == ["alice@example.org", "bob@example.net"]

    head, _, body = message.data.partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    names = [f.split(b":", 1)[0].lower() for f in fields]
    # DKIM signatures first, then Axiom's Received (TLS + AUTH), then the customer's.
    assert names[:4] == [b"dkim-signature", b"dkim-signature", b"received", b"received"], names
    assert b"a=rsa-sha256" in fields[0] and b"a=ed25519-sha256" in fields[1]
    assert all(b"d=acme.test" in f for f in fields[:2])
    assert re.match(
        rb"Received: from mail\.acme\.test \(\[127\.0\.0\.1\]\)\r\n\tby relay\.axiom\.test "
        rb"\(Axiom Send\) with ESMTPSA id " + queue_id.encode() + rb";",
        fields[2],
    ), fields[2]
    assert re.match(
        rb"Received: from client\.test \(unknown \[127\.0\.0\.1\]\)\r\n"
        rb"\tby mail\.acme\.test \(Postfix\) with ESMTP id " + postfix_id.encode(),
        fields[3],
    ), fields[3]
    assert b"Subject: Fattura 2024-17" in fields
    assert body == b"Gentile cliente,\r\nin allegato la fattura.\r\n"

    lookup = dkim_dns(axiom_home)
    verifier = dkim.DKIM(message.data)
    assert verifier.verify(idx=0, dnsfunc=lookup), "RSA signature does not verify"
    assert verifier.verify(idx=1, dnsfunc=lookup), "Ed25519 signature does not verify"


def test_customer_postfix_with_a_wrong_password_keeps_the_mail(relay, axiom_home, tenant):
    customer = start_customer(relay, tenant.username, tenant.password + "-wrong")
    try:
        postfix_id = customer.submit("billing@acme.test", ["alice@example.org"], invoice("<x@y>"))
        customer.wait_for_log(
            rf"{postfix_id}: .*status=deferred \(SASL authentication failed; "
            rf"server 127\.0\.0\.1\[127\.0\.0\.1\] said: 535 5\.7\.8 ",
            timeout=30,
        )
        # Deferred, not bounced: the customer's MTA still holds the message.
        assert any(p.name == postfix_id for p in customer.queue_files())
    finally:
        customer.stop()
    assert spool_count(axiom_home) == 0


def test_customer_postfix_pipelines_through_axiom(relay, axiom_home, tenant):
    # debug_peer_list makes Postfix's SMTP client log each command it writes ("> ...") and
    # each reply line it reads ("< ..."). Command by command they alternate; pipelined
    # (RFC 2920), MAIL, every RCPT and DATA are written before the first of their replies.
    customer = start_customer(relay, tenant.username, tenant.password, debug_peer_list="127.0.0.1")
    try:
        postfix_id = customer.submit(
            "billing@acme.test", ["alice@example.org", "bob@example.net"], invoice("<p@acme.test>")
        )
        queue_id = relayed_queue_id(customer, postfix_id, "alice@example.org")
        log = customer.log()
    finally:
        customer.stop()
    peer = r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+"
    dialog = [
        (m.group(1), m.group(2))
        for m in re.finditer(rf"postfix/smtp\[\d+\]: ([<>]) {peer}: (.*)", log)
    ]
    # The EHLO answer after STARTTLS, which is the one Postfix acts on (RFC 3207 4.2).
    starttls = dialog.index((">", "STARTTLS"))
    after_tls = [text for way, text in dialog[starttls:] if way == "<"]
    assert "250-PIPELINING" in after_tls and "250-ENHANCEDSTATUSCODES" in after_tls, after_tls
    mail = next(i for i, (way, text) in enumerate(dialog) if text.startswith("MAIL FROM:"))
    group = dialog[mail : mail + 8]
    assert [way for way, _ in group] == [">", ">", ">", ">", "<", "<", "<", "<"], group
    assert [text.split(":")[0] for _, text in group[:4]] == [
        "MAIL FROM",
        "RCPT TO",
        "RCPT TO",
        "DATA",
    ]
    assert [text for _, text in group[4:]] == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "250 2.1.5 Recipient OK",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    message, recipients = wait_spooled(axiom_home, queue_id)
    assert message is not None
    assert sorted(r.address for r in recipients) == ["alice@example.org", "bob@example.net"]
