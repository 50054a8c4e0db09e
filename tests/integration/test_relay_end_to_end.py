"""Submission to delivery through a running `axiom relay`: signed mail reaches the receiver."""

from __future__ import annotations

import smtplib
import ssl
import time
import urllib.request

import pytest
from sqlmodel import Session, select

from models import DeliveryEvent, RecipientState
from models.db import make_engine
from testbed.dns import knot  # noqa: F401  (fixture)
from testbed.postfix import SmtpSink, free_port
from tests.conftest import RelayProcess, seed_tenant
from tests.integration.delivery_world import RECEIVERS, world_zones

pytestmark = pytest.mark.integration


def _metrics(relay) -> str:
    with urllib.request.urlopen(f"{relay.http}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_submitted_mail_is_signed_and_delivered(axiom_home, knot):  # noqa: F811
    dns = knot(world_zones())
    port = free_port("127.0.0.50")
    _, gmail_address = RECEIVERS["gmail.com"]
    with SmtpSink(host=gmail_address, port=port, capture=True) as sink:
        relay = RelayProcess(
            axiom_home,
            {"AXIOM_DNS_NAMESERVERS": dns.nameserver, "AXIOM_DELIVERY_PORT": str(port)},
        ).start()
        try:
            acme = seed_tenant(axiom_home, "acme", "acme.example")
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP(*relay.submission, timeout=10) as client:
                client.starttls(context=ctx)
                client.login(acme.username, acme.password)
                client.sendmail(
                    "shop@acme.example",
                    ["ann@gmail.com"],
                    b"From: Shop <shop@acme.example>\r\nTo: ann@gmail.com\r\n"
                    b"Subject: Your order\r\n\r\nShipped.\r\n",
                )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not sink.messages():
                time.sleep(0.1)
            # The outcome is counted by provider and category once its settlement commits.
            delivered = 'axiom_delivery_outcomes_total{category="delivered",provider="google"} 1.0'
            while time.monotonic() < deadline and delivered not in (metrics := _metrics(relay)):
                time.sleep(0.1)
            assert delivered in metrics, metrics
        finally:
            relay.stop()
        [captured] = sink.messages()
    assert captured.count(b"DKIM-Signature:") == 2
    assert b"Subject: Your order" in captured
    assert b"X-Client-Addr: 127.0.0.1" in captured  # the default pool's address
    engine = make_engine(axiom_home.db_url)
    with Session(engine) as s:
        [event] = s.exec(select(DeliveryEvent)).all()
    engine.dispose()
    assert (event.category, event.provider, event.recipient) == (
        "delivered",
        "google",
        "ann@gmail.com",
    )
    queue = axiom_home.cli("queue", "--json").stdout
    assert f'"state": "{RecipientState.delivered}"' in queue
