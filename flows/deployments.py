"""One deployment per registered procedure: what `axiom flows serve` (started by `axiom up`)
registers. It passes the same settings (Procedure.options) to Runner.add_flow, so that its runs
start from the flow in memory (axiom/flow_runs.py); this list is for reading and registering
them elsewhere (tests, the fault matrix)."""

from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from flows.registry import procedures


def deployments() -> list[RunnerDeployment]:
    """Every Protocol procedure as a deployment: typed, described parameters (the Prefect UI
    form) and its runbook's version and schedule (flows/registry.py)."""
    return [procedure.deployment() for procedure in procedures()]
