"""What `axiom flows serve` (started by `axiom up`) serves: one deployment per runbook flow."""

from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment

from runbooks.loader import checkpoints, operator_verbs


def deployments() -> list[RunnerDeployment]:
    """Every Protocol procedure as a deployment with a typed parameter form in the Prefect UI."""
    from flows.operator_verbs import FLOWS
    from flows.suspend_stream import suspend_stream

    version = f"checkpoints-{checkpoints().version}"
    verbs = operator_verbs()
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
        *(
            verb_flow.to_deployment(
                name="on-demand",
                description=f"{verb_flow.description} The CLI does the same by hand.",
                tags=["protocol", "checkpoint", "operator-verb"],
                version=f"{verbs.id}-{verbs.version}",
            )
            for verb_flow in FLOWS
        ),
    ]
