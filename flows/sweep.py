"""The scheduled sweep (deployment procedures-sweep/scheduled): protocol/sweep.py does the work.

This module is its Prefect side: `PrefectRuns` reads, resumes and starts flow runs for it,
and the flow publishes what waits — the table `axiom procedures` prints — as an artifact in
the Prefect UI, only when something changed, so an idle sweep writes nothing but its run.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows import resources
from models.sandbox_clock import clock_for
from notifications.desk import approval_desk
from protocol import procedures
from protocol.sweep import RunsUnavailable, SweepReport, sweep
from runbooks.loader import procedures_sweep

ARTIFACT_KEY = "waiting-procedures"


class PrefectRuns:
    """protocol.sweep.Runs through the Prefect API: this process's (a flow run's), or the one
    at api_url (`axiom procedures sweep` run by hand)."""

    def __init__(self, api_url: str | None = None):
        self.api_url = api_url

    @contextlib.contextmanager
    def _api(self):
        """This API for the calls inside; a server that cannot be reached is RunsUnavailable."""
        import httpx
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            if self.api_url is None:
                yield
                return
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                yield
        except (httpx.HTTPError, OSError) as exc:
            raise RunsUnavailable(f"Prefect at {self.api_url or 'its API'}: {exc}") from exc

    def state(self, flow_run_id: str) -> str | None:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with self._api(), get_client(sync_client=True) as client:
            try:
                run = client.read_flow_run(UUID(flow_run_id))
            except ObjectNotFound:
                return None
        return run.state.type.value if run.state else None

    def resume(self, flow_run_id: str, run_input: dict | None) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.responses import SetStateStatus

        with self._api(), get_client(sync_client=True) as client:
            response = client.resume_flow_run(UUID(flow_run_id), run_input=run_input)
        return response.status == SetStateStatus.ACCEPT

    def start(self, deployment: str, parameters: dict) -> str:
        from prefect.deployments import run_deployment

        with self._api():
            run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=False)
        return str(run.id)


@flow(name="procedures-sweep", log_prints=False)
def procedures_sweep_flow() -> dict:
    """Expire overdue checkpoints, wake procedures whose answer or time has come, continue
    in a new run those whose run is gone (runbooks/procedures-sweep.yaml)."""
    settings = resources.settings()
    engine = resources.engine_for(settings)
    clock = clock_for(settings.environment, engine)
    rules = procedures_sweep()
    report: SweepReport = sweep(
        approval_desk(settings, engine),
        engine,
        PrefectRuns(),
        now=clock.now,
        rewake_after=timedelta(seconds=rules.spec.rewake_after_seconds),
    )
    logger = get_run_logger()
    if report.idle:
        logger.info("nothing to do")
        return report.as_json()
    logger.info("sweep: %s", report.as_json())
    waiting = procedures.open_procedures(engine, limit=200).items
    create_table_artifact(
        key=ARTIFACT_KEY,
        table=[w.as_json() for w in waiting] or [{"procedure": "(none waiting)"}],
        description=f"Open procedures after the sweep at {clock.now():%Y-%m-%d %H:%M} UTC",
    )
    return report.as_json()
