"""protocol/delisting.py on a migrated database (SQLite and PostgreSQL): protection suspends a
listed IP only at the providers that consult the list, renews without a second row and ends
by itself; lifting ends it now; the evidence sums the IP's last day by tenant and stream."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import select

from models import AuditEntry, DeliveryEvent, EventKind, Suspension, Tenant
from models.db import session_scope
from protocol import delisting
from runbooks.loader import blocklists

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
IP = "127.0.0.10"
ZEN = blocklists().spec.by_id("spamhaus-zen")
UCE = blocklists().spec.by_id("uceprotect-1")
RUNBOOK = ("blocklist-delisting", "1.0")


def _protect(engine, blocklist, now=NOW):
    with session_scope(engine) as s:
        result = delisting.protect(
            s, IP, blocklist, hours=6, now=now, actor="test", runbook=RUNBOOK
        )
        s.commit()
    return result


def _suspensions(engine):
    with session_scope(engine) as s:
        return {
            (r.provider, r.expires_at.replace(tzinfo=UTC)) for r in s.exec(select(Suspension)).all()
        }


def test_only_the_providers_that_consult_the_list_are_protected(engine):
    assert ZEN.consulted_by == ["microsoft", "yahoo", "apple", "generic"]
    result = _protect(engine, ZEN)
    assert result["started"] == ZEN.consulted_by
    assert {p for p, _ in _suspensions(engine)} == set(ZEN.consulted_by)  # google keeps it
    with session_scope(engine) as s:
        (entry,) = s.exec(select(AuditEntry).where(AuditEntry.action == "blocklist.protect")).all()
        assert entry.subject == f"ip:{IP}" and entry.evidence["list"] == "spamhaus-zen"


def test_a_list_no_provider_consults_protects_nothing(engine):
    assert _protect(engine, UCE)["started"] == []
    assert _suspensions(engine) == set()


def test_a_renewal_moves_the_end_and_writes_no_second_row_or_entry(engine):
    _protect(engine, ZEN)
    later = NOW + timedelta(minutes=15)
    result = _protect(engine, ZEN, later)
    assert result == {
        "started": [],
        "renewed": ZEN.consulted_by,
        "until": (later + timedelta(hours=6)).isoformat(),
    }
    rows = _suspensions(engine)
    assert len(rows) == 4 and {end for _, end in rows} == {later + timedelta(hours=6)}
    with session_scope(engine) as s:
        assert (
            len(s.exec(select(AuditEntry).where(AuditEntry.action == "blocklist.protect")).all())
            == 1
        )
    # after the end a new protection starts again (the old one ended by itself)
    assert _protect(engine, ZEN, later + timedelta(hours=7))["started"] == ZEN.consulted_by


def test_lift_ends_the_protection_now(engine):
    _protect(engine, ZEN)
    later = NOW + timedelta(hours=1)
    with session_scope(engine) as s:
        lifted = delisting.lift(s, IP, "spamhaus-zen", now=later, actor="t", runbook=RUNBOOK)
        s.commit()
        assert lifted == sorted(ZEN.consulted_by)
        assert delisting.still_suspended(s, IP, "spamhaus-zen", later) == []


def test_the_evidence_is_the_ips_last_day_by_tenant_and_stream(engine):
    with session_scope(engine) as s:
        acme, bolt = Tenant(name="acme"), Tenant(name="bolt")
        s.add_all([acme, bolt])
        s.flush()

        def add(tenant, stream, n, category="delivered", kind=EventKind.attempt, hours_ago=1, **kw):
            for _ in range(n):
                s.add(
                    DeliveryEvent(
                        at=NOW - timedelta(hours=hours_ago),
                        kind=kind,
                        tenant_id=tenant.id,
                        stream=stream,
                        message_id="m",
                        recipient="r@x.test",
                        source_ip=IP,
                        category=category,
                        **kw,
                    )
                )

        add(acme, "newsletter", 30)
        add(acme, "newsletter", 4, category="mailbox_unknown", permanent=True)
        add(acme, "newsletter", 3, category="complaint", kind=EventKind.complaint)
        add(acme, "newsletter", 2, category="rate_limited")
        add(bolt, "orders", 5)
        add(bolt, "orders", 50, hours_ago=30)  # older than the window
        s.commit()
        rows = delisting.traffic(s, IP, now=NOW, hours=24)
    assert rows == [
        {
            "tenant": "acme",
            "stream": "newsletter",
            "sent": 36,
            "delivered": 30,
            "deferred": 2,
            "refused": 4,
            "bounced": 0,
            "complaints": 3,
        },
        {
            "tenant": "bolt",
            "stream": "orders",
            "sent": 5,
            "delivered": 5,
            "deferred": 0,
            "refused": 0,
            "bounced": 0,
            "complaints": 0,
        },
    ]
    facts = dict(
        delisting.facts({"codes": ["127.0.0.2"], "first_seen": "x"}, rows, "fixed", ["microsoft"])
    )
    assert facts["messages in the last 24 h"] == "41" and facts["complaints"] == "3"
    assert facts["by tenant and stream"] == "acme/newsletter 36, bolt/orders 5"
