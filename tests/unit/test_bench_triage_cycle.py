"""bench/triage_cycle.py at a tiny size, on SQLite and PostgreSQL: a detection cycle over the
signals bench's data sees every subject, folds into the incidents of the first, and every
subject the old per-subject reader reads (some of each kind) reads the same as
signals_for_all. Behaviour, not speed (the figures are in bench/README.md). tests/ does not
import bench/ (.importlinter), so the bench runs as a command, on this test's database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# real databases filled to bench scale, or real processes: make test runs it, not test-fast
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 20_000


def test_the_triage_cycle_bench_reads_what_the_old_path_read(db_url, tmp_path):
    out = tmp_path / "triage_cycle.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.triage_cycle", "--url", db_url, "--events", str(EVENTS),
         "--repeat", "1", "--old-budget", "4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = json.loads(out.read_text())["runs"]
    assert run["errors"] == [] and run["events"] == EVENTS
    subjects = run["subjects"]
    assert subjects["total"] == sum(
        subjects[k] for k in ("ip-provider", "domain-provider", "stream")
    )
    assert subjects["stream"] == 60 and subjects["ip-provider"] > 300  # 50 IPs × 8 providers
    old = run["old"]
    assert old["measured"] > 0
    assert all(kind["measured"] > 0 for kind in old["per_kind"].values())
    assert run["incidents"] == run["causes"]
