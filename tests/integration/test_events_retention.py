"""The events-retention runbook through a real Prefect server, on the sandbox clock: a month
moved forward in one command rolls raw events up and expires them, audited, with the run's
table artifact in the Prefect UI; run again, it finds nothing to do and writes nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from sqlalchemy import func, insert, select

from models import AuditEntry, DeliveryEvent, EventRollup
from models.db import make_engine
from models.sandbox_clock import set_offset
from testbed.axiom import make_home

pytestmark = pytest.mark.integration


def _count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_a_month_on_the_sandbox_clock_rolls_up_and_expires_events(prefect, tmp_path, monkeypatch):
    from flows.events_retention import events_retention_flow

    home = make_home(tmp_path / "home", f"sqlite:///{tmp_path / 'axiom.db'}")
    for key, value in home.env.items():
        if key.startswith("AXIOM_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AXIOM_ENVIRONMENT", "sandbox")
    engine = make_engine(home.db_url)
    now = datetime.now(UTC)
    event = {
        "kind": "attempt",
        "tenant_id": 1,
        "stream": "transactional",
        "from_domain": "acme.example",
        "message_id": "01Q",
        "recipient": "r@gmail.com",
        "attempt": 1,
        "source_ip": "127.0.0.1",
        "provider": "google",
        "category": "delivered",
        "permanent": False,
    }
    with engine.begin() as conn:
        conn.execute(
            insert(DeliveryEvent),
            [event | {"at": now - timedelta(hours=h)} for h in range(1, 49)],
        )
    set_offset(engine, 31 * 86400)  # `axiom sandbox clock advance 31d`
    done = events_retention_flow()
    # 48 hours of events, one an hour, plus the month since: every hour rolled up (bounded
    # per run by hours_per_run), and the raw events older than 30 days, all 48, deleted.
    assert done["raw_deleted"] == 48
    assert done["hours_rolled"] == 168  # the runbook's hours_per_run: the rest next run
    assert _count(engine, DeliveryEvent) == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.sum(EventRollup.count))).scalar_one() == 48
        [entry] = conn.execute(
            select(AuditEntry.actor, AuditEntry.runbook_id).where(
                AuditEntry.action == "events.expire"
            )
        ).all()
    assert entry.actor.startswith("flow:") and entry.runbook_id == "events-retention"

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    keys = {a.key for a in asyncio.run(artifact())}
    assert "events-retention" in keys
    audited = _count(engine, AuditEntry)
    # The next runs catch up on the rolled-up hours; once caught up a run does nothing.
    runs = 0
    while (again := events_retention_flow())["hours_rolled"]:
        runs += 1
        assert runs < 10
    assert again["raw_deleted"] == 0 and _count(engine, AuditEntry) == audited
    engine.dispose()
