"""The Prefect UI's deployments come from the registry, with schedules (issue 12 §2).

Against a real Prefect server (`prefect server start` on loopback): every deployment that
flows.deployments builds is registered without being run, then read back through the Prefect
API with its version, described parameters and schedule; a runbook whose schedule is switched
off leaves its deployment with none; and `axiom runbooks list --json` reports the last and
next run of a deployment from that server.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.states import Completed, Running, Scheduled

from flows.deployments import deployments
from flows.registry import Procedure, procedures
from flows.suspend_stream import suspend_stream as suspend_stream_flow
from runbooks.loader import suspend_stream
from runbooks.schema_protocol import Schedule
from tests.conftest import VENV_BIN, free_port

pytestmark = pytest.mark.integration


def _with_schedule(schedule: Schedule, name: str) -> Procedure:
    """suspend-stream's runbook with another schedule: the path a scheduled runbook takes."""
    rules = suspend_stream().model_copy(update={"schedule": schedule})
    return Procedure(name, suspend_stream_flow, lambda: rules, "schedule round trip")


def test_registered_deployments_come_back_through_the_api_with_their_schedules(prefect):
    built = deployments()
    for deployment in built:
        deployment.apply()
    scheduled = [
        _with_schedule(Schedule(cron="0 3 * * *"), "nightly"),
        _with_schedule(Schedule(interval_seconds=900), "quarter-hourly"),
    ]
    for procedure in scheduled:
        procedure.deployment().apply()

    with get_client(sync_client=True) as client:
        for procedure in procedures():
            rules = procedure.runbook()
            stored = client.read_deployment_by_name(procedure.deployment_name)
            assert stored.version == f"{rules.id}-{rules.version}"
            # The sweep and reactions-watch every minute, events-retention hourly by cron,
            # dkim-rotation/scheduled and domain-health daily; the others on demand (a
            # runbook's on-demand deployment beside its scheduled one has no schedule).
            assert [
                getattr(s.schedule, "cron", None) or getattr(s.schedule, "interval").total_seconds()  # noqa: B009
                for s in stored.schedules
            ] == (
                [rules.schedule.cron or rules.schedule.interval_seconds]
                if rules.schedule.enabled and procedure.scheduled
                else []
            )
            fields = stored.parameter_openapi_schema["properties"]
            assert fields or rules.schedule.enabled
            assert all(f.get("description") for f in fields.values())
        listed = {d.name for d in client.read_deployments()}
        assert {p.name for p in procedures()} <= listed

        nightly = client.read_deployment_by_name("suspend-stream/nightly").schedules
        assert [type(s.schedule) for s in nightly] == [CronSchedule]
        assert (nightly[0].schedule.cron, nightly[0].schedule.timezone) == ("0 3 * * *", "UTC")
        assert nightly[0].active
        quarter = client.read_deployment_by_name("suspend-stream/quarter-hourly").schedules
        assert [type(s.schedule) for s in quarter] == [IntervalSchedule]
        assert quarter[0].schedule.interval == timedelta(minutes=15)

    # The runbook switches its schedule off: registered again, the deployment has none.
    _with_schedule(Schedule(enabled=False, cron="0 3 * * *"), "nightly").deployment().apply()
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("suspend-stream/nightly").schedules == []


def _runbooks_list(api_url: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "axiom"), "runbooks", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "AXIOM_HOME": str(tmp_path),
            "AXIOM_CONFIG": str(tmp_path / "absent.toml"),
            "AXIOM_PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(tmp_path / "prefect"),
        },
    )


def test_runbooks_list_shows_last_and_next_run_from_prefect(prefect, tmp_path):
    for deployment in deployments():
        deployment.apply()
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("suspend-stream/on-demand")
        params = {"tenant": "acme", "stream": "marketing", "reason": "list test"}
        done = client.create_flow_run_from_deployment(deployment.id, parameters=params)
        client.set_flow_run_state(done.id, Running(), force=True)
        client.set_flow_run_state(done.id, Completed(), force=True)
        later = client.create_flow_run_from_deployment(
            deployment.id,
            parameters=params,
            state=Scheduled(scheduled_time=now + timedelta(days=2)),
        )
        sooner = client.create_flow_run_from_deployment(
            deployment.id,
            parameters=params,
            state=Scheduled(scheduled_time=now + timedelta(hours=1)),
        )
        assert later.id != sooner.id

    listed = _runbooks_list(prefect.api_url, tmp_path)
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["prefect_error"] is None
    rows = {r["deployment"]: r for r in document["runbooks"] if r["deployment"]}
    assert set(rows) == {p.deployment_name for p in procedures()}
    row = rows["suspend-stream/on-demand"]
    assert (row["runbook"], row["version"], row["prefect"]) == (
        "suspend-stream",
        "1.0",
        "registered",
    )
    assert row["schedule"] == {
        "enabled": False,
        "cron": None,
        "interval_seconds": None,
        "text": "on demand",
    }
    assert (row["last_run"]["id"], row["last_run"]["state"]) == (str(done.id), "COMPLETED")
    assert (row["next_run"]["id"], row["next_run"]["state"]) == (str(sooner.id), "SCHEDULED")
    next_at = datetime.fromisoformat(row["next_run"]["time"])
    assert abs(next_at - (now + timedelta(hours=1))) < timedelta(seconds=5)
    verb = rows["pause-tenant/on-demand"]
    assert (verb["runbook"], verb["prefect"], verb["last_run"], verb["next_run"]) == (
        "operator-verbs",
        "registered",
        None,
        None,
    )


def test_runbooks_list_when_prefect_is_gone(tmp_path):
    """No server on the port: the command still answers, naming the API it could not reach."""
    gone = f"http://127.0.0.1:{free_port()}/api"
    listed = _runbooks_list(gone, tmp_path)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    document = json.loads(listed.stdout)
    assert document["prefect_error"].startswith(gone)
    assert {r["prefect"] for r in document["runbooks"] if r["deployment"]} == {"unreachable"}


def test_axiom_flows_serve_registers_every_deployment_of_the_registry(prefect, tmp_path):
    """What `axiom up` starts: the served deployments are the registry's, read back via the API."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AXIOM_HOME": str(tmp_path),
        "AXIOM_CONFIG": str(tmp_path / "absent.toml"),
        "PREFECT_API_URL": prefect.api_url,
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    with get_client(sync_client=True) as client:  # what the other tests registered goes
        for old in client.read_deployments():
            client.delete_deployment(old.id)
        assert client.read_deployments() == []
    serve = subprocess.Popen(
        [str(VENV_BIN / "axiom"), "flows", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = serve.stdout.readline()
        assert ready.startswith(f"flows ready: {len(procedures())} deployment(s)"), ready
        with get_client(sync_client=True) as client:
            for procedure in procedures():
                stored = client.read_deployment_by_name(procedure.deployment_name)
                rules = procedure.runbook()
                assert stored.version == f"{rules.id}-{rules.version}"
                assert bool(stored.schedules) == (rules.schedule.enabled and procedure.scheduled)
            sweep = client.read_deployment_by_name("procedures-sweep/scheduled")
            assert [s.schedule.interval for s in sweep.schedules] == [timedelta(seconds=60)]
    finally:
        serve.terminate()
        serve.wait(30)
