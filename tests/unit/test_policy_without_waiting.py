"""PolicyStore's without_waiting answers: what the SMTP handler may learn without leaving the event
loop, and what it must ask from a thread."""

from __future__ import annotations

import secrets
import sqlite3
import time

from models import Suppression, Tenant
from models.db import session_scope
from relay.submission.auth import CredentialCache
from relay.submission.keystore import KeyBox
from relay.submission.policy import WOULD_WAIT, PolicyStore


def _policy(engine) -> PolicyStore:
    return PolicyStore(
        engine, KeyBox(KeyBox.generate()), CredentialCache(secrets.token_bytes(32), 60)
    )


def _tenant_with_suppression(engine, address: str, reason: str) -> int:
    with session_scope(engine) as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.flush()
        s.add(Suppression(tenant_id=tenant.id, address=address, reason=reason))
        s.commit()
        return tenant.id


def test_suppression_is_answered_at_once_on_sqlite_and_from_a_thread_on_postgresql(engine, db_url):
    tenant_id = _tenant_with_suppression(engine, "gone@example.org", "hard bounce: 550 5.1.1")
    policy = _policy(engine)
    # The blocking read answers on both databases, whatever the address's case.
    assert policy.suppression_reason(tenant_id, "Gone@Example.org") == "hard bounce: 550 5.1.1"
    assert policy.suppression_reason(tenant_id, "here@example.org") is None
    without_waiting = policy.suppression_reason(tenant_id, "gone@example.org", without_waiting=True)
    unknown = policy.suppression_reason(tenant_id, "here@example.org", without_waiting=True)
    if db_url.startswith("sqlite"):
        assert without_waiting == "hard bounce: 550 5.1.1"
        assert unknown is None
    else:  # a network round trip: never on the event loop
        assert without_waiting is WOULD_WAIT
        assert unknown is WOULD_WAIT


def test_a_suppression_added_after_a_miss_is_seen_by_the_next_at_once_read(tmp_path):
    from models.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'axiom.db'}"
    migrate(url)
    engine = make_engine(url)
    tenant_id = _tenant_with_suppression(engine, "first@example.org", "complaint")
    policy = _policy(engine)
    assert policy.suppression_reason(tenant_id, "next@example.org", without_waiting=True) is None
    with session_scope(engine) as s:
        s.add(Suppression(tenant_id=tenant_id, address="next@example.org", reason="complaint"))
        s.commit()
    # Not cached: a hard bounce stops the very next message.
    assert (
        policy.suppression_reason(tenant_id, "next@example.org", without_waiting=True)
        == "complaint"
    )
    engine.dispose()


def test_a_busy_sqlite_sends_the_at_once_read_to_a_thread_without_waiting(tmp_path):
    from models.db import make_engine, migrate

    path = tmp_path / "axiom.db"
    url = f"sqlite:///{path}"
    migrate(url)
    engine = make_engine(url)
    tenant_id = _tenant_with_suppression(engine, "gone@example.org", "complaint")
    engine.dispose()  # exclusive locking mode needs every other connection closed
    policy = _policy(engine)
    # Another process holding SQLite's exclusive lock (WAL in exclusive locking mode) makes
    # every other reader busy.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE suppression SET reason = reason")
    try:
        started = time.monotonic()
        answer = policy.suppression_reason(tenant_id, "gone@example.org", without_waiting=True)
        waited = time.monotonic() - started
        assert answer is WOULD_WAIT
        assert waited < 1.0  # busy_timeout 0: it gave up at once instead of stalling the loop
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (
        policy.suppression_reason(tenant_id, "gone@example.org", without_waiting=True)
        == "complaint"
    )
    engine.dispose()
