"""What `axiom flows serve` (started by `axiom up`) serves: one deployment per runbook flow."""

from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from runbooks.loader import checkpoints


def deployments() -> list[RunnerDeployment]:
    """Every Protocol procedure as a deployment with a typed parameter form in the Prefect UI."""
    from flows.suspend_stream import suspend_stream

    version = f"checkpoints-{checkpoints().version}"
    return [
        suspend_stream.to_deployment(
            name="on-demand",
            description=(
                "Hold a tenant stream's outgoing mail after an operator approves it in Slack, "
                "in this run's Resume form, or with `axiom approve`."
            ),
            tags=["protocol", "checkpoint"],
            version=version,
        ),
    ]
