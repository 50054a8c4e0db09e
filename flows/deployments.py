"""What `axiom flows serve` (started by `axiom up`) serves: one deployment per registered procedure."""

from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from flows.registry import procedures


def deployments() -> list[RunnerDeployment]:
    """Every Protocol procedure as a deployment: typed, described parameters (the Prefect UI
    form) and its runbook's version and schedule (flows/registry.py)."""
    return [procedure.deployment() for procedure in procedures()]
