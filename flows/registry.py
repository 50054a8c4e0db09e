"""The registry of procedures: every Protocol flow, its runbook, and how it is deployed.

flows/deployments.py builds every deployment from this list (`axiom flows serve`, started by
`axiom up`, serves them) and `axiom runbooks list` reads it, so adding a procedure is one entry
here plus its runbook file. A deployment takes from the procedure's runbook its version
(`<runbook id>-<version>`) and its schedule (runbooks/<id>.yaml `schedule`: a cron expression
in UTC or an interval, or `enabled: false` for on demand only); its parameters, with their
descriptions, come from the flow's signature and become the form in the Prefect UI.

The rule for a scheduled procedure: a run that finds nothing to do costs one query and
writes nothing but its own flow-run record. It reads what it would act on first (one select,
no locks), returns at once when that is empty, and only then opens transactions, asks
checkpoints, creates artifacts or posts to Slack; "nothing to do" is a log line, not an audit
entry. Scheduled runs of every procedure may then run all day beside the relay at no cost to
it (issue 12 measures the relay's rate with every schedule running).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from prefect import Flow
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval
from prefect.schedules import Schedule as PrefectSchedule

from runbooks.loader import (
    blocklist_delisting,
    blocklist_scan,
    degradation_triage,
    dkim_rotation,
    domain_health,
    domain_onboarding,
    events_retention,
    ip_warmup,
    operator_verbs,
    procedures_sweep,
    reactions_watch,
    suspend_stream,
)
from runbooks.schema_protocol import ProcedureRunbook, Schedule


@dataclass(frozen=True)
class Procedure:
    """One deployment: `<flow name>/<name>` in Prefect, governed by `runbook()`."""

    name: str
    flow: Flow
    runbook: Callable[[], ProcedureRunbook]
    description: str  # the deployment's; the parameters' are in the flow's signature
    tags: tuple[str, ...] = field(default=("protocol",))
    # False: on demand although its runbook has a schedule (a runbook's second deployment,
    # e.g. dkim-rotation/on-demand beside dkim-rotation/scheduled)
    scheduled: bool = True

    @property
    def deployment_name(self) -> str:
        return f"{self.flow.name}/{self.name}"

    def options(self) -> dict:
        """The deployment's settings, as Flow.to_deployment and Runner.add_flow take them."""
        rules = self.runbook()
        return {
            "name": self.name,
            "description": self.description,
            "tags": list(self.tags),
            "version": f"{rules.id}-{rules.version}",
            "schedules": prefect_schedules(rules.schedule) if self.scheduled else [],
        }

    def deployment(self) -> RunnerDeployment:
        return self.flow.to_deployment(**self.options())


def prefect_schedules(schedule: Schedule) -> list[PrefectSchedule]:
    """The runbook's schedule as Prefect's; switched off, none: the deployment runs on demand."""
    if not schedule.enabled:
        return []
    if schedule.cron is not None:
        return [Cron(schedule.cron, timezone="UTC")]
    return [Interval(timedelta(seconds=schedule.interval_seconds or 0), timezone="UTC")]


def procedures() -> list[Procedure]:
    """Every procedure of the Protocol, in the order `axiom runbooks list` shows them."""
    from flows.blocklist_delisting import blocklist_delisting_flow
    from flows.blocklist_scan import blocklist_scan_flow
    from flows.degradation_triage import degradation_triage_flow
    from flows.dkim_rotation import dkim_rotation_flow
    from flows.domain_health import domain_health_flow
    from flows.domain_onboarding import domain_onboarding as domain_onboarding_flow
    from flows.events_retention import events_retention_flow
    from flows.ip_warmup import ip_warmup_flow
    from flows.operator_verbs import FLOWS
    from flows.suspend_stream import suspend_stream as suspend_stream_flow
    from flows.sweep import procedures_sweep_flow
    from flows.watch_reactions import reactions_watch_flow

    return [
        Procedure(
            name="scheduled",
            flow=procedures_sweep_flow,
            runbook=procedures_sweep,
            description=(
                "The engine's sweep: expires overdue checkpoints (safe default), wakes waiting "
                "procedures whose answer or time has come, continues those whose run is gone."
            ),
            tags=("protocol", "engine"),
        ),
        Procedure(
            name="scheduled",
            flow=reactions_watch_flow,
            runbook=reactions_watch,
            description=(
                "Announces the relay's automatic suspensions and throttles in Slack, grouped "
                "per path and window; opens an incident when they recur on a path."
            ),
            tags=("protocol", "signals"),
        ),
        Procedure(
            name="scheduled",
            flow=events_retention_flow,
            runbook=events_retention,
            description=(
                "Rolls delivery events up per hour and subject, then deletes raw events and "
                "roll-ups past their retention (runbooks/events-retention.yaml)."
            ),
            tags=("protocol", "signals"),
        ),
        Procedure(
            name="on-demand",
            flow=domain_onboarding_flow,
            runbook=domain_onboarding,
            description=(
                "Onboard a sending domain: its DKIM keys and records, DNS checked until right, "
                "a pool proposed (dedicated or shared), activation approved by a lead."
            ),
            tags=("protocol", "checkpoint", "domains"),
        ),
        Procedure(
            name="scheduled",
            flow=dkim_rotation_flow,
            runbook=dkim_rotation,
            description=(
                "Starts a DKIM key rotation for every active domain whose keys have signed for "
                "the runbook's period (one run of dkim-rotation/on-demand each)."
            ),
            tags=("protocol", "domains"),
        ),
        Procedure(
            name="on-demand",
            flow=dkim_rotation_flow,
            runbook=dkim_rotation,
            description=(
                "Rotate one domain's DKIM keys: new selectors, DNS checked, approval, the switch, "
                "the old keys kept published for the overlap, then retired."
            ),
            tags=("protocol", "checkpoint", "domains"),
            scheduled=False,
        ),
        Procedure(
            name="scheduled",
            flow=domain_health_flow,
            runbook=domain_health,
            description=(
                "Re-checks every active domain's DNS and reads the DMARC aggregate reports; "
                "opens an incident, alerts Slack and tells the customer when something breaks."
            ),
            tags=("protocol", "domains"),
        ),
        Procedure(
            name="scheduled",
            flow=ip_warmup_flow,
            runbook=ip_warmup,
            description=(
                "Judges every warming IP and new domain per provider on the day that ended: "
                "advance, hold a provider, or stop and ask; writes the new day's caps."
            ),
            tags=("protocol", "warmup"),
        ),
        Procedure(
            name="on-demand",
            flow=ip_warmup_flow,
            runbook=ip_warmup,
            description=(
                "Start warming an IP on a plan, review a warm-up the signals stopped, or "
                "declare an IP warm: each through a checkpoint (action and its fields)."
            ),
            tags=("protocol", "checkpoint", "warmup"),
            scheduled=False,
        ),
        Procedure(
            name="scheduled",
            flow=blocklist_scan_flow,
            runbook=blocklist_scan,
            description=(
                "Checks every sending IP and domain against the DNS blocklists; a listed IP is "
                "suspended at once at the providers that consult the list, and delisted."
            ),
            tags=("protocol", "blocklists"),
        ),
        Procedure(
            name="on-demand",
            flow=blocklist_delisting_flow,
            runbook=blocklist_delisting,
            description=(
                "Get a listed IP off a blocklist: evidence, the cause fixed first, the request "
                "(or the wait), the listing watched until it clears, then a re-warm."
            ),
            tags=("protocol", "checkpoint", "blocklists"),
        ),
        Procedure(
            name="scheduled",
            flow=degradation_triage_flow,
            runbook=degradation_triage,
            description=(
                "Every subject's delivery signals against the runbook's thresholds, its own "
                "baseline and its declared volume; one incident per subject and cause, with the "
                "evidence and the proposed action; starts a respond run for each new one."
            ),
            tags=("protocol", "signals"),
        ),
        Procedure(
            name="respond",
            flow=degradation_triage_flow,
            runbook=degradation_triage,
            description=(
                "Act on one triage incident (action respond, incident_id): lower the rate at "
                "once, or ask triage.act and apply the approved action through the operator "
                "verbs; verify after the cause's interval; resolve or escalate."
            ),
            tags=("protocol", "checkpoint", "signals"),
            scheduled=False,
        ),
        Procedure(
            name="on-demand",
            flow=suspend_stream_flow,
            runbook=suspend_stream,
            description=(
                "Hold a tenant stream's outgoing mail after an operator approves it in Slack, "
                "in this run's Resume form, or with `axiom approve`."
            ),
            tags=("protocol", "checkpoint"),
        ),
        *(
            Procedure(
                name="on-demand",
                flow=verb_flow,
                runbook=operator_verbs,
                description=f"{verb_flow.description} The CLI does the same by hand.",
                tags=("protocol", "checkpoint", "operator-verb"),
            )
            for verb_flow in FLOWS
        ),
    ]
