"""bench/signals.py at a tiny size, on SQLite and PostgreSQL: its fill stores events the way
SQLAlchemy does, so window_stats counts every one of them in its window, before and after the
roll-up. Behaviour, not speed (the figures are in bench/README.md). tests/ does not import
bench/ (.importlinter), so the bench runs as a command, on this test's database."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import DeliveryEvent, EventRollup, HoldTally, Tenant
from models.audit import as_utc
from models.db import make_engine
from protocol import signals

# real databases filled to bench scale, or real processes: make test runs it, not test-fast
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 20_000


def test_the_signals_bench_fills_what_window_stats_then_counts(db_url, tmp_path):
    out = tmp_path / "signals.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.signals", "--url", db_url, "--events", str(EVENTS),
         "--repeat", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = json.loads(out.read_text())["runs"]
    assert run["errors"] == [] and run["events"] == EVENTS
    now = datetime.fromisoformat(run["now"])
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(DeliveryEvent)).scalar() == EVENTS
            assert conn.execute(select(func.count()).select_from(Tenant)).scalar() == 20
            first, last = conn.execute(
                select(func.min(DeliveryEvent.at), func.max(DeliveryEvent.at))
            ).one()
            # Every completed hour is rolled up: all events but the current hour's.
            rolled = conn.execute(select(func.sum(EventRollup.count))).scalar()
            current = conn.execute(
                select(func.count())
                .select_from(DeliveryEvent)
                .where(DeliveryEvent.at >= now.replace(minute=0, second=0, microsecond=0))
            ).scalar()
            tallied = conn.execute(select(func.sum(HoldTally.count))).scalar()
        # Eight days ending now; read back as SQLAlchemy stores them on this backend.
        assert now - timedelta(days=8) <= as_utc(first) < as_utc(last) < now
        assert rolled == EVENTS - current > 0 and tallied > 0
        for window, seconds in signals.WINDOWS.items():
            with engine.connect() as conn:
                filled = conn.execute(
                    select(func.count())
                    .select_from(DeliveryEvent)
                    .where(DeliveryEvent.at >= now - timedelta(seconds=seconds))
                ).scalar()
            assert 0 < filled < EVENTS
            for by in signals.SUBJECTS:
                stats = signals.window_stats(engine, by, window, now)
                counted = sum(s.sent + s.bounced + s.complaints for s in stats.subjects)
                assert counted == filled, (by, window)
                # The bench counted the same, before and after its roll-up.
                for phase in ("raw", "rolled"):
                    assert run[phase]["counts"][f"{by}/{window}"]["events"] == filled
        # The 7-day window of every kind of subject sees the fill's variety.
        week = {by: signals.window_stats(engine, by, "7d", now) for by in signals.SUBJECTS}
        assert len(week["provider"].subjects) == 8 and len(week["ip"].subjects) == 50
        assert len(week["stream"].subjects) == 60 and len(week["domain"].subjects) == 300
        outcomes = week["provider"].subjects[0]
        assert outcomes.delivered > outcomes.deferred > outcomes.refused_total > 0
        assert outcomes.bounced > 0 and outcomes.complaints > 0
    finally:
        engine.dispose()
