"""Opportunistic STARTTLS from the delivery engine's connection pool (relay/delivery/engine.py).

Every outbound session to an MX that offers STARTTLS is encrypted with one context the pool
built once, which reads no CA bundle: nothing is verified (RFC 7435), and aiosmtplib's own
per-connection default context loaded the system's CA bundle each time, a third of the
delivery engine's CPU in the warm-up month (issue 11).
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiosmtpd.controller import Controller

from config.tls import write_self_signed
from relay.delivery.egress import SourceIp
from relay.delivery.engine import ConnectionPool, opportunistic_tls_context
from runbooks import loader
from testbed.postfix import free_port


def test_the_context_verifies_nothing_and_holds_no_ca_bundle():
    context = opportunistic_tls_context()
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False
    assert context.cert_store_stats() == {"crl": 0, "x509": 0, "x509_ca": 0}
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2  # what create_default_context had


@pytest.fixture
def starttls_mx(tmp_path):
    """A receiving SMTP server on loopback offering STARTTLS with a self-signed certificate."""
    cert, key = tmp_path / "mx.crt", tmp_path / "mx.key"
    write_self_signed(cert, key, "mx.tls.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    port = free_port()
    controller = Controller(object(), hostname="127.0.0.1", port=port, tls_context=server_context)
    controller.start()
    yield port
    controller.stop()


def test_every_session_is_encrypted_with_the_pools_one_context(starttls_mx, monkeypatch):
    built: list[ssl.SSLContext] = []
    default = ssl.create_default_context

    def counting(*args, **kwargs):
        built.append(default(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    pool = ConnectionPool("relay.test", starttls_mx, loader.delivery().spec)
    source = SourceIp("127.0.0.1", "relay.test", "default")

    async def two_sessions():
        sessions = [await pool._open(source, "127.0.0.1") for _ in range(2)]
        contexts = [s.get_transport_info("sslcontext") for s in sessions]
        for s in sessions:
            await s.quit()
        return contexts

    contexts = asyncio.run(two_sessions())
    assert all(c is not None for c in contexts), "STARTTLS was offered and not used"
    assert contexts[0] is contexts[1] is pool._tls
    assert built == [], "a default context (and the CA bundle) was built per connection"
