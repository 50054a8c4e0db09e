"""The Prefect server on PostgreSQL, as the README's "Running on more than one machine" sets it up.

A fresh database is created on the shared PostgreSQL, `prefect server start` runs against it
with Prefect's documented PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://…, a flow
runs against the server through PREFECT_API_URL, the API says it completed, and the flow run
is a row in that PostgreSQL database. The server's whole process group is stopped and the
database dropped, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from models.db import normalise_url
from tests.conftest import PG_URL, VENV_BIN, free_port

pytestmark = pytest.mark.integration

FLOW = """
from prefect import flow, task


@task
def double(x: int) -> int:
    return 2 * x


@flow(name="axiom-postgres-smoke")
def smoke(n: int) -> int:
    return sum(double(i) for i in range(n))


state = smoke(4, return_state=True)
print(state.state_details.flow_run_id, state.type.value, state.result(), flush=True)
"""


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _get(url: str, body: dict | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def prefect_database(postgres_admin):
    name = f"prefect_{secrets.token_hex(5)}"
    with postgres_admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield make_url(normalise_url(PG_URL)).set(database=name)
    with postgres_admin.connect() as conn:  # WITH (FORCE): a server left behind cannot keep it
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_prefect_server_on_postgresql_runs_a_flow(tmp_path, prefect_database):
    database: URL = prefect_database
    prefect_url = database.set(drivername="postgresql+asyncpg").render_as_string(False)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AXIOM_"))} | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": prefect_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
    }
    log = tmp_path / "prefect-server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        started = time.monotonic()
        healthy = False
        while time.monotonic() - started < 180 and not healthy:
            assert server.poll() is None, log.read_text(errors="replace")[-4000:]
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                healthy = _get(f"{api}/health") is True
            time.sleep(0.5)
        assert healthy, log.read_text(errors="replace")[-4000:]
        print(f"\nprefect server healthy on PostgreSQL in {time.monotonic() - started:.1f}s")

        run = subprocess.run(
            [sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=180
        )
        assert run.returncode == 0, run.stdout + run.stderr
        flow_run_id, state, result = run.stdout.strip().splitlines()[-1].split()
        assert (state, result) == ("COMPLETED", "12")

        flow_run = _get(f"{api}/flow_runs/{flow_run_id}")
        assert flow_run["state_type"] == "COMPLETED"
        assert flow_run["parameters"] == {"n": 4}
        flow = _get(f"{api}/flows/{flow_run['flow_id']}")
        assert flow["name"] == "axiom-postgres-smoke"
        task_runs = _get(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        assert sorted(t["state_type"] for t in task_runs) == ["COMPLETED"] * 4

        # The run is a row in *that* PostgreSQL database, and Prefect made no SQLite file.
        engine = create_engine(database)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    text("SELECT state_type FROM flow_run WHERE id = :id"), {"id": flow_run_id}
                ).one()
        finally:
            engine.dispose()
        assert row[0] == "COMPLETED"
        assert not list(home.rglob("*.db"))
    finally:
        _stop_group(server)
    assert _group_alive(server.pid) == []
