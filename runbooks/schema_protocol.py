"""Typed shape of the human checkpoints: who may answer each kind, how long it waits, what then.

Declared the way StackStorm declares `core.ask`: a checkpoint is an ordinary step with the
roles allowed to answer, a time to live, and a safe default taken when no one answers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from runbooks.schema import RunbookBase, Strict

# What the checkpoint does when its time to live runs out. Never "approve": silence is not
# consent (DESIGN principle 3); "escalate" also posts an alert so a person picks it up.
SafeDefault = Literal["do_nothing", "do_nothing_and_escalate"]

ROLE_PATTERN = r"^[a-z][a-z0-9-]{1,31}$"


class Role(Strict):
    name: str = Field(pattern=ROLE_PATTERN)
    description: str


class Checkpoint(Strict):
    kind: str = Field(
        pattern=r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$",
        description="noun.verb, e.g. stream.suspend; also the Approval row's kind",
    )
    title: str
    description: str = ""
    # Who may answer; an operator needs at least one of these roles (deny by default).
    roles: list[str] = Field(min_length=1)
    # Up to 90 days: a checkpoint waits in the database, not in a process (flows/procedure.py),
    # so a procedure may give people weeks; the sweep takes the expiry.
    ttl_seconds: int = Field(ge=60, le=90 * 86400)
    safe_default: SafeDefault


class CheckpointsSpec(Strict):
    roles: list[Role] = Field(min_length=1)
    checkpoints: list[Checkpoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointsSpec:
        names = [r.name for r in self.roles]
        if len(names) != len(set(names)):
            raise ValueError("role names must be unique")
        kinds = [c.kind for c in self.checkpoints]
        if len(kinds) != len(set(kinds)):
            raise ValueError("checkpoint kinds must be unique")
        for checkpoint in self.checkpoints:
            unknown = sorted(set(checkpoint.roles) - set(names))
            if unknown:
                raise ValueError(
                    f"checkpoint {checkpoint.kind}: roles {', '.join(unknown)} are not declared"
                )
        return self

    def for_kind(self, kind: str) -> Checkpoint:
        for checkpoint in self.checkpoints:
            if checkpoint.kind == kind:
                return checkpoint
        raise KeyError(f"no checkpoint of kind {kind!r} is declared in runbooks/checkpoints.yaml")

    @property
    def role_names(self) -> set[str]:
        return {r.name for r in self.roles}


class CheckpointsRunbook(RunbookBase):
    kind: Literal["checkpoints"]
    spec: CheckpointsSpec


# --- the operator verbs (runbooks/operator-verbs.yaml, read by protocol/verbs.py) --------


class OperatorVerb(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$", description="noun.verb")
    command: str = Field(description="The CLI command an operator types")
    flow: str = Field(pattern=r"^[a-z][a-z0-9-]+$", description="The Prefect flow's name")
    checkpoint: str = Field(description="The checkpoint kind whose roles may do it")
    wakes: bool = Field(description="Whether it wakes the mail the lifted state postponed")
    description: str


class OperatorVerbsSpec(Strict):
    # The relay re-reads egress state (pools, bindings, IP states, suspensions) at most this
    # long after a change (relay/delivery/egress.py, Egress ttl). Mail woken sooner could be
    # claimed against the old snapshot and postponed again for capped_wait_seconds.
    wake_after_seconds: float = Field(
        ge=0,
        le=60,
        description="Woken mail falls due this long after the change (the egress snapshot's age)",
    )
    verbs: list[OperatorVerb] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> OperatorVerbsSpec:
        names = [v.name for v in self.verbs]
        if len(names) != len(set(names)):
            raise ValueError("verb names must be unique")
        return self

    def verb(self, name: str) -> OperatorVerb:
        for verb in self.verbs:
            if verb.name == name:
                return verb
        raise KeyError(f"no operator verb {name!r} in runbooks/operator-verbs.yaml")


# --- procedures: the runbooks that are Prefect deployments (flows/registry.py) ----------

# Names of months and weekdays as cron accepts them (Vixie cron, and croniter, which Prefect
# uses to read the expression).
_MONTHS = {
    m: n
    for n, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_WEEKDAYS = {d: n for n, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _WEEKDAYS),
)


def check_cron(expression: str) -> str:
    """Refuse what is not a 5-field cron expression or macro, naming the field that is wrong.

    Checked here, not with Prefect's parser, because the relay loads the runbooks too and
    never imports Prefect; flows/registry.py hands the expression to Prefect's Cron, and a
    test builds every shipped schedule with it.
    """
    if expression.strip().lower() in _CRON_MACROS:
        return expression
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"cron {expression!r}: needs 5 fields (minute hour day-of-month month day-of-week) "
            "or a macro such as @daily"
        )
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            span, slash, step = part.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"cron {expression!r}: bad step in the {name} field {text!r}")
            if span == "*":
                continue
            bounds = span.split("-")
            values = [names.get(b.lower(), int(b) if b.isdigit() else None) for b in bounds]
            if len(bounds) > 2 or any(v is None or not low <= v <= high for v in values):
                raise ValueError(
                    f"cron {expression!r}: the {name} field {text!r} is not within {low}-{high}"
                )
    return expression


class Schedule(Strict):
    """When a procedure runs by itself: a cron expression (UTC) or an interval, or off.

    Off (`enabled: false`) the procedure runs only on demand; it may keep its cron or
    interval, so switching it back on is one word.
    """

    enabled: bool = Field(default=True, description="false: on demand only")
    cron: str | None = Field(default=None, description="5-field cron expression, in UTC")
    interval_seconds: int | None = Field(default=None, ge=1, le=366 * 86400)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @model_validator(mode="after")
    def _one_way(self) -> Schedule:
        if self.cron is not None and self.interval_seconds is not None:
            raise ValueError("give cron or interval_seconds, not both")
        if self.enabled and self.cron is None and self.interval_seconds is None:
            raise ValueError("an enabled schedule needs cron or interval_seconds")
        return self

    def describe(self) -> str:
        """For people: `cron 0 3 * * * UTC`, `every 15m`, `on demand`."""
        if not self.enabled:
            return "on demand"
        if self.cron is not None:
            return f"cron {self.cron} UTC"
        seconds = self.interval_seconds or 0
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"every {seconds // size}{unit}"
        return f"every {seconds}s"


KIND_PATTERN = r"^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+$"


class ProcedureRunbook(RunbookBase):
    """What every procedure's runbook declares besides its own rules (`spec`).

    The loader checks across files that each checkpoint kind is declared in
    runbooks/checkpoints.yaml and each template exists in every language.
    """

    schedule: Schedule
    checkpoints: list[Annotated[str, Field(pattern=KIND_PATTERN)]] = Field(
        default_factory=list, description="Checkpoint kinds it may ask (runbooks/checkpoints.yaml)"
    )
    templates: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]] = Field(
        default_factory=list, description="Its texts: runbooks/templates/<language>/<name>.j2"
    )

    @model_validator(mode="after")
    def _unique_lists(self) -> ProcedureRunbook:
        for name in ("checkpoints", "templates"):
            values = getattr(self, name)
            if len(values) != len(set(values)):
                raise ValueError(f"{name} must be unique")
        return self


class SuspendStreamSpec(Strict):
    checkpoint: str = Field(
        pattern=KIND_PATTERN, description="The checkpoint asked before a stream is held"
    )


class SuspendStreamRunbook(ProcedureRunbook):
    kind: Literal["suspend-stream"]
    spec: SuspendStreamSpec

    @model_validator(mode="after")
    def _asks_a_declared_checkpoint(self) -> SuspendStreamRunbook:
        if self.spec.checkpoint not in self.checkpoints:
            raise ValueError(f"spec.checkpoint {self.spec.checkpoint} is not in checkpoints")
        return self


class OperatorVerbsRunbook(ProcedureRunbook):
    kind: Literal["operator-verbs"]
    spec: OperatorVerbsSpec

    @model_validator(mode="after")
    def _asks_declared_checkpoints(self) -> OperatorVerbsRunbook:
        for verb in self.spec.verbs:
            if verb.checkpoint not in self.checkpoints:
                raise ValueError(
                    f"verb {verb.name}: checkpoint {verb.checkpoint} not in checkpoints"
                )
        return self


class SweepSpec(Strict):
    rewake_after_seconds: int = Field(
        default=600,
        ge=10,
        le=86400,
        description=(
            "A procedure that has not moved for this long while Prefect shows its run as "
            "running (the run's process was killed), or that was woken and not taken up, is "
            "continued in a new run. A guess: longer than any step takes, short next to any wait"
        ),
    )


class ProceduresSweepRunbook(ProcedureRunbook):
    """The engine's own scheduled procedure: expiries, wake-ups, runs that are gone."""

    kind: Literal["procedures-sweep"]
    spec: SweepSpec


class ReactionsWatchSpec(Strict):
    window_seconds: int = Field(
        ge=60,
        le=86400,
        description="Reactions on one subject within this window share one Slack message",
    )
    recur_window_seconds: int = Field(
        ge=3600, le=30 * 86400, description="How far back recurrences are counted"
    )
    recur_threshold: int = Field(
        ge=2, le=100, description="This many reactions on one subject in the window: an incident"
    )
    critical_threshold: int = Field(
        ge=2, le=1000, description="This many: the incident is critical"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReactionsWatchSpec:
        if self.critical_threshold < self.recur_threshold:
            raise ValueError("critical_threshold must be at least recur_threshold")
        return self


class ReactionsWatchRunbook(ProcedureRunbook):
    """Announce the relay's automatic reactions; open incidents when they recur."""

    kind: Literal["reactions-watch"]
    spec: ReactionsWatchSpec


class EventsRetentionSpec(Strict):
    raw_days: int = Field(
        ge=1,
        le=400,
        description=(
            "Raw delivery events (one row per outcome, bounce, complaint) are kept this many "
            "days, then deleted once their hour is rolled up; hold-tally rows too"
        ),
    )
    rollup_days: int = Field(
        ge=30,
        le=3650,
        description="Hourly roll-ups are kept this many days (trends and 7-day baselines)",
    )
    hours_per_run: int = Field(
        ge=1,
        le=24 * 400,
        description=(
            "At most this many hours are rolled up in one run, so a first run over a long "
            "history is bounded; the next runs catch up"
        ),
    )
    delete_batch: int = Field(
        ge=1000,
        le=1_000_000,
        description="Raw events deleted per statement, so no transaction holds the spool long",
    )

    @model_validator(mode="after")
    def _rollups_outlive_raw(self) -> EventsRetentionSpec:
        if self.rollup_days < self.raw_days:
            raise ValueError("rollup_days must be at least raw_days")
        return self


class EventsRetentionRunbook(ProcedureRunbook):
    """Roll raw events up per hour and subject, and delete what is past retention."""

    kind: Literal["events-retention"]
    spec: EventsRetentionSpec
