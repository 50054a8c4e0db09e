"""The audit trail is append-only and hash-chained; tampering is found and named."""

import itertools
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlmodel import select

from models import AuditEntry
from models.audit_trail import record, verify


def _fill(session, n=5):
    for i in range(n):
        record(
            session,
            actor=f"operator:op{i}",
            action="test.act",
            subject=f"thing:{i}",
            evidence={"i": i, "when": datetime(2026, 1, 1, tzinfo=UTC)},
            runbook_id="dkim-signing",
            runbook_version="1.0",
        )
    session.commit()


def test_chain_links_and_verifies(session):
    _fill(session)
    entries = session.exec(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert entries[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert verify(session) == (5, None)


def test_edited_evidence_is_detected(session, engine):
    _fill(session)
    with engine.begin() as conn:
        conn.execute(text("UPDATE auditentry SET actor = 'operator:mallory' WHERE id = 3"))
    session.expire_all()
    _count, broken = verify(session)
    assert broken is not None and broken.entry_id == 3
    assert broken.reason == "content does not match its hash"


def test_deleted_entry_is_detected(session, engine):
    _fill(session)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM auditentry WHERE id = 2"))
    session.expire_all()
    _, broken = verify(session)
    assert broken is not None and broken.entry_id == 3
    assert "prev_hash" in broken.reason


@pytest.mark.integration  # the axiom CLI as a subprocess: `make test`, not test-fast
def test_cli_lists_and_verifies(axiom_home):
    axiom_home.cli("tenant", "add", "acme")
    listed = axiom_home.cli("audit", "--json").stdout
    assert '"action": "tenant.add"' in listed
    # The home already holds the default pool's entry (as after `axiom init`).
    assert "audit chain intact: 2 entries verified" in axiom_home.cli("audit", "--verify").stdout
    from models.db import make_engine

    engine = make_engine(axiom_home.db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE auditentry SET subject = 'tenant:evil' WHERE id = 1"))
    engine.dispose()
    result = axiom_home.cli("audit", "--verify", check=False)
    assert result.returncode == 1
    assert "audit chain broken at entry 1: content does not match its hash" in result.stderr
