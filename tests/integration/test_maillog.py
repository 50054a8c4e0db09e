"""The maillog lines in a running relay's log: a refused recipient, an accepted message and
its delivery attempt each leave exactly one line an operator can grep for."""

from __future__ import annotations

import re
import smtplib
import ssl
import time

import pytest

from testbed.dns import knot, merge_zones, ptr_zones  # noqa: F401  (knot: fixture)
from testbed.postfix import SmtpSink
from tests.conftest import RelayProcess, free_port, seed_tenant

pytestmark = pytest.mark.integration

MX_ADDRESS = "127.0.0.52"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO axiom\.maillog "


@pytest.fixture
def db_url(tmp_path) -> str:
    """SQLite only: the log lines do not depend on the database backend."""
    return f"sqlite:///{tmp_path / 'axiom.db'}"


@pytest.fixture(params=[1, 2], ids=["one-process", "listener-child"])
def world(request, axiom_home, knot):  # noqa: F811
    """With AXIOM_RELAY_PROCESSES=2 a listener child takes the SMTP session and the parent
    delivers: both write to the one log."""
    zones = merge_zones(
        {"example.org": [("@", "MX", "10 mx.example.org."), ("mx.example.org.", "A", MX_ADDRESS)]},
        ptr_zones({"127.0.0.1": "relay.axiom.test"}),
    )
    dns = knot(zones)
    port = free_port(MX_ADDRESS)
    sink = SmtpSink(host=MX_ADDRESS, port=port, capture=True).start()
    tenant = seed_tenant(axiom_home, "acme", "acme.example")
    relay = RelayProcess(
        axiom_home,
        {
            "AXIOM_DNS_NAMESERVERS": dns.nameserver,
            "AXIOM_DELIVERY_PORT": str(port),
            "AXIOM_RELAY_PROCESSES": str(request.param),
        },
    ).start()
    yield relay, tenant, sink
    relay.stop()
    sink.stop()


def _maillog(relay: RelayProcess) -> list[str]:
    return [
        line
        for line in relay.log.read_text(errors="replace").splitlines()
        if "axiom.maillog" in line
    ]


def _wait_for(relay: RelayProcess, pattern: str, timeout: float = 30) -> list[str]:
    """Every maillog line once one matches pattern (the delivery runs after the 250)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _maillog(relay)
        if any(re.search(pattern, line) for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_refused_recipient_accepted_message_and_delivery_each_log_one_line(world):
    relay, tenant, sink = world
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(*relay.submission, local_hostname="client.test", timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.login(tenant.username, tenant.password)
        smtp.mail("shop@acme.example")
        assert smtp.rcpt("bob@localhost")[0] == 501
        assert smtp.rcpt("alice@example.org")[0] == 250
        code, reply = smtp.data(
            b"From: Shop <shop@acme.example>\r\nTo: alice@example.org\r\n\r\nHello.\r\n"
        )
    assert code == 250, reply
    queue_id = reply.decode().rsplit(" ", 1)[1]

    lines = _wait_for(relay, rf"send_attempt id={queue_id} ")
    expected = [
        rf"auth client=127\.0\.0\.1 user={re.escape(tenant.username)} ok=yes",
        rf"rejected client=127\.0\.0\.1 tenant=acme user={re.escape(tenant.username)} "
        r"command=RCPT from=shop@acme\.example to=bob@localhost "
        r'reply="501 5\.1\.3 Bad recipient address syntax"',
        rf"queued client=127\.0\.0\.1 tenant=acme user={re.escape(tenant.username)} "
        rf"id={queue_id} from=shop@acme\.example to=alice@example\.org",
        rf"send_attempt id={queue_id} from=shop@acme\.example to=alice@example\.org attempt=1 "
        r'source=127\.0\.0\.1 mx=mx\.example\.org outcome=delivered reply="250 2\.0\.0 Ok"',
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(STAMP + pattern, line), (line, pattern)
    assert len(sink.messages()) == 1
