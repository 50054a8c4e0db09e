"""The suspend-stream runbook's action: a hold the relay's egress honours, and only that stream."""

from __future__ import annotations

import pytest
from sqlmodel import select

from config.clock import SystemClock
from config.settings import Settings, load_settings
from flows import resources
from flows.suspend_stream import HOLD_POOL, StreamState, hold_stream, read_stream
from models import AuditEntry
from models.db import session_scope
from protocol import egress, tenants
from relay.delivery.egress import Egress


@pytest.fixture
def settings(db_url) -> Settings:
    """What the flow resolves once and passes to its tasks."""
    yield load_settings(database_url=db_url)
    resources.forget()


@pytest.fixture
def acme(engine):
    with session_scope(engine) as s:
        egress.ensure_default_pool(s)
        tenant = tenants.add_tenant(s, "acme")
        s.commit()
        return tenant.id


def test_tasks_share_one_engine_per_process_and_database(settings, tmp_path):
    engine = resources.engine_for(settings)
    assert resources.engine_for(load_settings(database_url=settings.db_url)) is engine
    other = load_settings(database_url=f"sqlite:///{tmp_path / 'other.db'}")
    assert resources.engine_for(other) is not engine


def test_a_held_stream_waits_and_the_others_keep_sending(engine, acme, settings):
    with session_scope(engine) as s:
        state = read_stream(s, "acme", "marketing")
        assert state == StreamState(
            tenant="acme",
            stream="marketing",
            pool="default",
            fallback_pool=None,
            queued_recipients=0,
        )
        hold_stream(s, state, 7, "alice", "spam-trap hits", actor="flow:test")
        s.commit()

    egress = Egress(engine, SystemClock(), ttl=0)
    held = egress.choose(acme, "marketing", "gmail")
    assert held.source is None
    assert f"pool {HOLD_POOL} has no IP addresses" in held.wait_reason
    assert egress.choose(acme, "transactional", "gmail").source.address == "127.0.0.1"
    with session_scope(engine) as s:
        assert read_stream(s, "acme", "marketing").held

    with session_scope(engine) as s:
        entry = s.exec(select(AuditEntry).where(AuditEntry.action == "stream.suspend")).one()
    assert entry.subject == "stream:acme/marketing"
    assert entry.evidence["previous_pool"] == "default"
    assert (entry.evidence["approval_id"], entry.evidence["approved_by"]) == (7, "alice")
    assert (entry.runbook_id, entry.runbook_version) == ("suspend-stream", "1.0")
    with session_scope(engine) as s:
        created = s.exec(select(AuditEntry).where(AuditEntry.subject == f"pool:{HOLD_POOL}")).one()
    assert (created.action, created.runbook_id) == ("pool.add", "suspend-stream")


def test_a_hold_pool_that_has_addresses_cannot_hold(engine, acme, settings):
    with session_scope(engine) as s:
        egress.add_pool(s, HOLD_POOL, "shared")
        egress.add_ip(s, "127.0.0.9", HOLD_POOL, None, 100)
        s.commit()
    with session_scope(engine) as s:
        state = read_stream(s, "acme", "marketing")
        with pytest.raises(RuntimeError, match="pool 'hold' has addresses"):
            hold_stream(s, state, 1, "alice", "x", actor="flow:test")


def test_an_unknown_tenant_is_a_clear_error(engine, acme):
    with (
        session_scope(engine) as s,
        pytest.raises(ValueError, match="tenant 'nobody' does not exist"),
    ):
        read_stream(s, "nobody", "marketing")
