"""The sandbox world publishes what the domain runbooks ask for: a pending domain's records as
runbooks/dns-records.yaml renders them (DKIM, SPF, DMARC, the return path's MX and SPF), SPF
and PTRs for the relay's addresses; so the onboarding runbook's DNS checks pass against the
sandbox DNS as they would against a diligent customer's zone, and `make up` can onboard."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from models.db import make_engine, migrate, session_scope
from protocol import dns_checks, domains, egress, tenants
from relay.submission.keystore import KeyBox
from sandbox.testing import world_settings
from sandbox.world import SandboxWorld

pytestmark = pytest.mark.integration


async def test_a_pending_domain_checks_out_against_the_sandbox_dns(tmp_path):
    settings = world_settings(tmp_path / "home", database_url=f"sqlite:///{tmp_path}/axiom.db")
    migrate(settings.db_url)
    engine = make_engine(settings.db_url)
    with session_scope(engine) as s:
        egress.ensure_default_pool(s)  # 127.0.0.1, its PTR the relay's hostname
        tenants.add_tenant(s, "acme")
        domains.add_domain(s, KeyBox(KeyBox.generate()), "acme", "shop.example")
        s.commit()
    world = SandboxWorld(settings)
    await world.start()
    try:
        await world.refresh()
        with session_scope(engine) as s:
            expected = dns_checks.expected_records(
                s, "shop.example", settings.hostname, settings.dmarc_mailbox
            )
        host, _, port = settings.sandbox_dns_listen.rpartition(":")
        result = await asyncio.to_thread(  # the world answers on this event loop
            dns_checks.check_domain, expected, [(host, int(port))], now=datetime.now(UTC)
        )
    finally:
        await world.stop()
        engine.dispose()
    failing = {c.name: c.reason for c in result.checks if not c.ok}
    assert result.passed and not failing, failing
    # the relay's domain authorises reports about the customer's (RFC 7489 §7.1)
    rua = result.get("dmarc.rua")
    assert "Authorization record not found" not in rua.reason, rua.reason
    names = {c.name for c in result.checks}
    assert {"spf.include", "dmarc.record", "return_path.mx", "return_path.spf"} <= names
    assert "fcrdns:127.0.0.1" in names
    assert sum(name.startswith("dkim:") for name in names) == 2
