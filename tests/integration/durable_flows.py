"""A procedure that waits days of sandbox time, served by its own runner for the durable tests.

No runbook of the Protocol waits on a clock yet (the warm-up will), so the engine's time wait
is tried here with the smallest procedure that has one: record a step, wait `days`, record
another. Run as `python -m tests.integration.durable_flows` from the checkout's root; it
serves this flow and the sweep, and prints "flows ready" like `axiom flows serve`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace

from prefect import flow

from flows.procedure import ProcedureId, procedure

RUNBOOK = SimpleNamespace(id="test-wait", version="1")


@flow(name="wait-days")
def wait_days(days: float = 30, procedure_id: ProcedureId = None) -> dict:
    """Record when it began, wait `days` of the procedure's clock, record when it went on."""
    with procedure(RUNBOOK, subject="test:wait", procedure_id=procedure_id) as p:  # type: ignore[arg-type]
        began = p.step("began", lambda _s: {"at": p.now().isoformat()})
        until = _parse(began["at"]) + timedelta(days=days)
        p.sleep_until("days", until, waiting_for=f"{days:g} days")
        went_on = p.step("went-on", lambda _s: {"at": p.now().isoformat()})
        outcome = {"began": began["at"], "went_on": went_on["at"]}
        p.finish(outcome)
        return outcome


def _parse(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text)


if __name__ == "__main__":
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=False)
    runner.add_deployment(wait_days.to_deployment(name="test"))
    print("flows ready", flush=True)
    asyncio.run(runner.start())
