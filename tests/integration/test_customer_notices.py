"""A customer notice travels as mail: rendered in the tenant's language, submitted to a running
`axiom relay` as the system sender, DKIM-signed by it and delivered to the contact's MX."""

from __future__ import annotations

import email
import time
from email.policy import default

import dkim
import pytest
from sqlmodel import Session, select

from config.settings import load_settings
from models import AuditEntry
from models.db import make_engine, session_scope
from notifications import customer_mail
from protocol import domains, tenants
from testbed.dns import knot  # noqa: F401  (fixture)
from testbed.postfix import SmtpSink, free_port
from tests.conftest import RelayProcess, seed_tenant
from tests.integration.delivery_world import RECEIVERS, world_zones
from tests.patching import published_dkimpy

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the relay's paths: elsewhere
def test_a_notice_arrives_in_the_tenants_language_signed_by_the_relay(axiom_home, knot):  # noqa: F811
    dns = knot(world_zones())
    port = free_port("127.0.0.50")
    _, gmail_address = RECEIVERS["gmail.com"]
    host, submission_port = axiom_home.host, axiom_home.ports["submission"]
    settings = load_settings(
        home=axiom_home.path,
        database_url=axiom_home.db_url,
        submission_listen=f"{host}:{submission_port}",
        slack_language="en",
    )
    seed_tenant(axiom_home, "rossi", "negozio-rossi.example")
    engine = make_engine(axiom_home.db_url)
    try:
        with session_scope(engine) as s:
            tenants.set_tenant(s, "rossi", contact="ufficio.rossi@gmail.com")  # language: it
            customer_mail.ensure_notice_sender(s, settings)  # what `axiom init` does
            s.commit()
        with SmtpSink(host=gmail_address, port=port, capture=True) as sink:
            relay = RelayProcess(
                axiom_home,
                {"AXIOM_DNS_NAMESERVERS": dns.nameserver, "AXIOM_DELIVERY_PORT": str(port)},
            ).start()
            try:
                with session_scope(engine) as s:
                    outcome = customer_mail.send_notice(
                        s,
                        settings,
                        "rossi",
                        "email_tenant_paused",
                        actor="flow:test",
                        at="2026-03-02 09:30 UTC",
                        queued_recipients=12,
                    )
                    s.commit()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not sink.messages():
                    time.sleep(0.1)
            finally:
                relay.stop()
            captured = sink.messages()
        with Session(engine) as s:
            records = {
                r.name: r.value
                for r in domains.domain_records(s, "relay.axiom.test", "relay.axiom.test")
                if r.purpose.startswith("DKIM")
            }
            [audited] = s.exec(select(AuditEntry).where(AuditEntry.action == "notice.sent")).all()
    finally:
        engine.dispose()

    assert outcome["sent"], outcome
    assert outcome["said"].startswith(
        "notice email_tenant_paused sent to tenant rossi at ufficio.rossi@gmail.com (it)"
    )
    assert (audited.actor, audited.subject) == ("flow:test", "tenant:rossi")
    assert audited.evidence["queued_as"] == outcome["queued_as"]
    [raw] = captured
    message = email.message_from_bytes(raw, policy=default)
    assert message["From"] == "Axiom Send <notices@relay.axiom.test>"
    assert message["To"] == "ufficio.rossi@gmail.com"
    assert message["Subject"] == "L'invio dal suo account rossi è sospeso"
    assert message["Auto-Submitted"] == "auto-generated"
    body = message.get_content()
    assert body.startswith("Gentile cliente,")
    assert "i 12 destinatari già accettati restano in coda" in body
    # Signed by the relay with the notice domain's keys, as any tenant's mail: both signatures
    # verify with dkimpy as published, against the records `axiom domain records` gives.
    signatures = [v for k, v in message.items() if k.lower() == "dkim-signature"]
    assert len(signatures) == 2 and all("d=relay.axiom.test" in s for s in signatures)
    assert len(records) == 2

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value else None

    with published_dkimpy():
        for idx in range(2):
            assert dkim.DKIM(raw).verify(idx=idx, dnsfunc=lookup), f"signature {idx}"
        tampered = raw.replace(b"4.7.1", b"4.7.2")  # the body, altered after signing
        assert tampered != raw
        with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
            dkim.DKIM(tampered).verify(idx=0, dnsfunc=lookup)
