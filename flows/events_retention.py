"""Runbook events-retention: roll delivery events up per hour and subject, expire what is past
retention (runbooks/events-retention.yaml; protocol/signals.py does the work).

Scheduled hourly. Each completed hour is rolled up in one transaction with the cursor's move,
so a run cut off halfway loses nothing and the next run continues; deletions are audited.
The run's result is a table artifact: what was rolled up, what was deleted.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext

from flows import resources
from models.sandbox_clock import clock_for
from protocol.signals import roll_up_and_expire
from runbooks.loader import events_retention


@flow(name="events-retention", log_prints=False)
def events_retention_flow() -> dict:
    """Roll up every completed hour of delivery events per subject, then delete raw events
    past the runbook's raw_days and roll-ups past its rollup_days."""
    logger = get_run_logger()
    settings = resources.settings()
    engine = resources.engine_for(settings)
    rules = events_retention()
    run = FlowRunContext.get()
    actor = f"flow:{run.flow_run.id}" if run and run.flow_run else "flow:events-retention"
    done = roll_up_and_expire(
        engine,
        rules.spec,
        clock_for(settings.environment, engine).now(),
        actor=actor,
        runbook=(rules.id, rules.version),
    )
    if done.idle:
        logger.info("nothing to do")
        return done.as_json()
    create_table_artifact(
        key="events-retention",
        table=[{"what": k.replace("_", " "), "value": v} for k, v in done.as_json().items()],
        description=f"Roll-up and retention (raw {rules.spec.raw_days} d, roll-ups "
        f"{rules.spec.rollup_days} d)",
    )
    logger.info("%s", done.as_json())
    return done.as_json()
