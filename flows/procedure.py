"""A procedure as its flow run sees it: steps done once, waits that hold no process.

A Protocol flow reads top-down (RUNBOOKS.md); wrapped in `procedure(...)` it becomes durable:

    with procedure(runbook, subject=..., parameters=..., procedure_id=procedure_id) as p:
        state = p.step("read", lambda session: read(session))       # replayed when done
        decision = request_approval(..., procedure=p)              # may end this run here
        p.step("act", lambda session: act(session))                # once, with its audit
        return p.finish(outcome)

How a wait holds no process. In a run of a deployment (what `axiom flows serve` runs), a wait
records itself on the Procedure row and *suspends* the run (`suspend_flow_run`): the run's
process exits and the run shows as Suspended in the Prefect UI — with the approval's Resume
form when it waits for a person. When it is resumed (an answer from Slack or the CLI, the UI
form, or the sweep once the wait is over) Prefect starts the flow again from the top; the
recorded steps replay from the database, the suspend with the same key returns at once, and
the run goes on. When a run is gone (its process killed, Prefect's own pause deadline passed,
the run deleted), the sweep (flows/sweep.py) starts a new run of the deployment with
`procedure_id`, which replays the same way. Steps are recorded under a unique (procedure, step)
key in the transaction of their action, so two runs of one procedure act once.

A run without a deployment (a flow called directly: tests, a script) has nothing that could
start it again, so it waits in its own process, as a paused run, and its expiry timer runs
there (flows/checkpoint.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from prefect.context import FlowRunContext
from prefect.exceptions import PrefectSignal
from prefect.flow_runs import suspend_flow_run
from pydantic import Field
from pydantic_core import to_jsonable_python
from sqlalchemy import Engine
from sqlmodel import Session

from config.clock import Clock
from config.settings import Settings
from flows import resources
from models.db import session_scope
from models.sandbox_clock import clock_for
from protocol import procedures
from runbooks.schema import RunbookBase

log = logging.getLogger("axiom.procedures")

# Every procedure flow takes this parameter: empty when a person or a schedule starts it; the
# sweep sets it when it continues a procedure whose run is gone.
ProcedureId = Annotated[
    int | None,
    Field(
        default=None,
        description="Leave empty. Set by the sweep when it continues a procedure in a new run",
    ),
]

# Prefect's own deadline for a suspended run is a backstop behind the sweep, which wakes the
# run when its wait is over (sandbox time may run ahead of Prefect's): past it, the run is
# failed by Prefect and the sweep continues the procedure in a new run.
SUSPEND_GRACE_SECONDS = 86_400
IN_PROCESS_POLL_SECONDS = 1.0


@dataclass
class ProcedureRun:
    """The procedure one flow run executes (protocol/procedures.py holds its state)."""

    id: int
    name: str
    subject: str
    runbook: RunbookBase
    settings: Settings
    engine: Engine
    clock: Clock
    flow_run_id: str
    durable: bool  # the run belongs to a deployment: waits suspend it and end its process

    def now(self) -> datetime:
        return self.clock.now()

    @property
    def actor(self) -> str:
        return f"flow:{self.flow_run_id}"

    def done(self, step: str) -> dict | None:
        """What `step` returned when it was done, or None if it was not."""
        return procedures.step_result(self.engine, self.id, step)

    def step(self, step: str, act: Callable[[Session], dict]) -> dict:
        """Do `act` once for this procedure: in one transaction with the step's record, so a
        second run (or this run started again) gets the first result back instead."""
        earlier = self.done(step)
        if earlier is not None:
            return earlier
        with session_scope(self.engine) as session:
            result = act(session)
            try:
                procedures.record_step(
                    session, self.id, step, result, flow_run_id=self.flow_run_id, now=self.now()
                )
            except procedures.StepAlreadyDone as first:
                return first.result
            session.commit()
        return result

    def wait(
        self,
        key: str,
        *,
        waiting_for: str,
        until: datetime | None,
        approval_id: int | None = None,
        wait_for_input: type | None = None,
        timeout_seconds: float | None = None,
    ):
        """Record the wait, then suspend this run (durable) — returning only when the run is
        started again and Prefect hands back the resume for `key` (and its input, if any).
        Without a deployment this returns at once: the caller waits in-process."""
        procedures.wait(
            self.engine,
            self.id,
            key=key,
            waiting_for=waiting_for,
            until=until,
            approval_id=approval_id,
            now=self.now(),
        )
        if not self.durable:
            return None
        seconds = timeout_seconds
        if seconds is None and until is not None:
            seconds = (until - self.now()).total_seconds()
        timeout = math.ceil(max(seconds or 0, 0)) + SUSPEND_GRACE_SECONDS
        answer = suspend_flow_run(wait_for_input=wait_for_input, timeout=timeout, key=key)
        procedures.resumed(self.engine, self.id, now=self.now())
        return answer

    def sleep_until(self, key: str, until: datetime, *, waiting_for: str) -> None:
        """Go on at `until` (on this procedure's clock: the sandbox clock in the sandbox)."""
        wakes = 0
        while self.now() < until:
            if self.durable:
                wakes += 1  # woken early (a hand-made resume): suspend again under a new key
                self.wait(f"{key}#{wakes}", waiting_for=waiting_for, until=until)
                continue
            procedures.wait(
                self.engine, self.id, key=key, waiting_for=waiting_for, until=until, now=self.now()
            )
            time.sleep(min(IN_PROCESS_POLL_SECONDS, (until - self.now()).total_seconds()))
        procedures.resumed(self.engine, self.id, now=self.now())

    def poll(
        self,
        name: str,
        check: Callable[[Session], dict],
        *,
        until: datetime,
        every: timedelta,
        waiting_for: str,
    ) -> dict:
        """Repeat a recorded check until it passes or one is made at or after `until`,
        sleeping `every` between checks on this procedure's clock (no process waits).

        `check` is a step returning at least {"passed": bool, "at": ISO 8601 time}. A run
        started again replays the checks already made; a replayed check never ends the wait
        early (the next one is made first), so the last check is always a fresh one."""
        attempt = 0
        while True:
            attempt += 1
            result = self.step(f"{name}#{attempt}", check)
            at = datetime.fromisoformat(result["at"])
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
            if result["passed"] or at >= until:
                return result
            self.sleep_until(
                f"{name}-next#{attempt}", min(at + every, until), waiting_for=waiting_for
            )

    def finish(self, outcome: dict) -> None:
        procedures.finish(self.engine, self.id, outcome, now=self.now())


@contextmanager
def procedure(
    runbook: RunbookBase,
    *,
    subject: str,
    procedure_id: int | None = None,
    settings: Settings | None = None,
) -> Iterator[ProcedureRun]:
    """Begin (or take up again) the procedure this flow run executes.

    The run's parameters are kept with the procedure: a new run that continues it gets them.

    A suspension passes through (the procedure waits); any other exception fails the
    procedure with its message, and the run fails as usual.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("procedure() runs inside a flow run")
    settings = settings or resources.settings()
    engine = resources.engine_for(settings)
    clock = clock_for(settings.environment, engine)
    flow_run = context.flow_run
    deployment = None
    if flow_run.deployment_id is not None and context.flow is not None:
        deployment = _deployment_name(context.flow.name, flow_run)
    row = procedures.begin(
        engine,
        name=context.flow.name if context.flow else runbook.id,
        deployment=deployment,
        runbook_id=runbook.id,
        runbook_version=runbook.version,
        subject=subject,
        parameters=to_jsonable_python(
            {k: v for k, v in (flow_run.parameters or {}).items() if k != "procedure_id"}
        ),
        flow_run_id=str(flow_run.id),
        procedure_id=procedure_id,
        now=clock.now(),
    )
    run = ProcedureRun(
        id=row.id or 0,
        name=row.name,
        subject=subject,
        runbook=runbook,
        settings=settings,
        engine=engine,
        clock=clock,
        flow_run_id=str(flow_run.id),
        durable=deployment is not None,
    )
    try:
        yield run
    except PrefectSignal:
        raise  # suspended (Pause) or cancelled by Prefect: the procedure's state says where
    except Exception as exc:
        procedures.finish(
            engine,
            run.id,
            {"error": f"{type(exc).__name__}: {exc}"},
            now=clock.now(),
            failed=True,
        )
        raise


def _deployment_name(flow_name: str, flow_run) -> str | None:
    """`<flow>/<deployment>` of this run, read once from the API (None if unreadable)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(flow_run.deployment_id)
    except Exception as exc:  # without it the run still works, in-process
        log.warning("deployment of run %s not readable (%s); waiting in-process", flow_run.id, exc)
        return None
    return f"{flow_name}/{deployment.name}"
