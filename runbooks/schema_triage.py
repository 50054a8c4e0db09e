"""Typed shape of the degradation-triage runbook (runbooks/degradation-triage.yaml): per signal a
warn and an act level over a short and a long window, each counted only above its minimums;
the subject's own 7-day baseline; the declared volume; which signals suggest which cause; and
per cause the ladder of actions proposed one after the other while the subject does not
improve. protocol/triage.py reads it (assess, suspect, propose, verify)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from runbooks.schema import Category, Strict
from runbooks.schema_protocol import KIND_PATTERN, ProcedureRunbook

# The windows of protocol/signals.py a level may name (7d is the baseline's).
WindowName = Literal["15m", "1h", "24h"]
WINDOW_SECONDS = {"15m": 900, "1h": 3600, "24h": 86400}
SubjectKind = Literal["ip-provider", "domain-provider", "stream"]
Outcome = Literal["refused", "deferred", "bounced", "complaint"]
Over = Literal["sent", "delivered", "answered"]
CauseName = Literal[
    "volume-spike", "reputation", "authentication", "content", "list-quality", "blocklisting"
]
ActionName = Literal["lower_rate", "pause_stream", "move_stream", "pause_tenant", "customer_report"]
Severity = Literal["warning", "critical"]
# Findings that are not a rate of one kind of event: protocol/triage.py computes them from the
# declared volume and the baseline; a clue may name them like a signal.
VOLUME_SIGNALS = ("volume_declared", "volume_change")


class Count(Strict):
    """Which events a signal counts: an outcome, in these categories (empty: every one)."""

    outcome: Outcome = Field(
        description="refused: permanent answers to attempts; deferred: transient ones; "
        "bounced: asynchronous permanent bounces; complaint: feedback-loop reports"
    )
    categories: list[Category] = Field(default_factory=list)


class Level(Strict):
    """One window of a signal: warn at or above `warn`, act at or above `act`, and neither
    below min_sends (in the rate's denominator) or min_events (in its numerator)."""

    window: WindowName
    warn: float = Field(gt=0, le=1)
    act: float = Field(gt=0, le=1)
    min_sends: int = Field(ge=1, description="Counted in the rate's denominator (`over`)")
    min_events: int = Field(ge=1, description="Counted in the rate's numerator")
    source: str = Field(description="Where the numbers come from, or 'our choice'")

    @model_validator(mode="after")
    def _warn_below_act(self) -> Level:
        if self.warn >= self.act:
            raise ValueError("warn must be below act")
        return self


class SignalRule(Strict):
    description: str
    counts: list[Count] = Field(min_length=1)
    over: Over = Field(
        description="The denominator: sent (attempts), delivered, or answered (delivered "
        "plus refused: the recipients that got a final answer)"
    )
    short: Level
    long: Level
    change_min: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Baseline rule: the least absolute rise over the 7-day rate that counts "
        "as a change of behaviour; absent, the signal is not compared with its baseline",
    )

    @model_validator(mode="after")
    def _short_before_long(self) -> SignalRule:
        if WINDOW_SECONDS[self.short.window] >= WINDOW_SECONDS[self.long.window]:
            raise ValueError("the short window must be shorter than the long one")
        return self

    def categories(self) -> set[str]:
        return {c for count in self.counts for c in count.categories}


class Baseline(Strict):
    """The subject's own last 7 days (protocol/signals.py's 7d window, less the window it is
    compared with): a signal's rate over its long window at `factor` times the baseline's
    rate and at least the signal's change_min above it is a change of behaviour (info), even
    below the absolute levels; so is a day's volume at volume_factor times the average day."""

    factor: float = Field(gt=1)
    min_events: int = Field(ge=1, description="Events in the compared window")
    min_baseline_sends: int = Field(ge=1, description="The baseline's denominator, at least")
    volume_factor: float = Field(gt=1)
    volume_min_sends: int = Field(ge=1, description="Final answers in the last 24 h, at least")
    source: str


class Declared(Strict):
    """A stream's final answers over 24 h against the daily volume declared at onboarding
    (Stream.declared_per_day)."""

    warn_factor: float = Field(gt=0)
    act_factor: float = Field(gt=0)
    min_sends: int = Field(ge=1, description="Final answers in 24 h, at least")
    source: str

    @model_validator(mode="after")
    def _warn_below_act(self) -> Declared:
        if self.warn_factor >= self.act_factor:
            raise ValueError("warn_factor must be below act_factor")
        return self


class Clue(Strict):
    """A finding of this signal suggests the cause; with a category, only when that category
    holds the most of the finding's events."""

    signal: str
    category: Category | None = None
    subjects: list[SubjectKind] | None = Field(
        default=None, description="Only on these subjects (absent: every subject of the cause)"
    )


class Step(Strict):
    """One rung of a cause's ladder: proposed at these severities, unless tried already."""

    action: ActionName
    severities: list[Severity] = Field(default_factory=lambda: ["warning", "critical"])


class CauseRule(Strict):
    description: str
    subjects: list[SubjectKind] = Field(min_length=1, description="Where it is suspected")
    clues: list[Clue] = Field(min_length=1)
    ladder: list[Step] = Field(description="Proposed in order while the subject does not improve")
    verify_after_seconds: int = Field(ge=300, le=7 * 86400)
    source: str


class ActionRule(Strict):
    description: str
    subjects: list[SubjectKind] = Field(min_length=1, description="Subjects it can act on")
    approval: Literal["required", "automatic"] = Field(
        description="automatic only for what is reversible and ends by itself (DESIGN 3)"
    )
    duration_seconds: int | None = Field(default=None, ge=60, le=7 * 86400)
    rate_factor: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _automatic_ends(self) -> ActionRule:
        if self.approval == "automatic" and self.duration_seconds is None:
            raise ValueError("an automatic action must end by itself: give duration_seconds")
        return self


class TriageSpec(Strict):
    checkpoint: str = Field(pattern=KIND_PATTERN)
    subjects: list[SubjectKind] = Field(min_length=1)
    signals: dict[str, SignalRule] = Field(min_length=1)
    baseline: Baseline
    declared: Declared
    causes: dict[CauseName, CauseRule] = Field(
        min_length=1, description="In order of precedence when findings are equally severe"
    )
    actions: dict[ActionName, ActionRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> TriageSpec:
        for name in self.signals:
            if name in VOLUME_SIGNALS:
                raise ValueError(f"signals.{name}: the name is the volume rules'")
        for cause, rule in self.causes.items():
            for clue in rule.clues:
                if clue.signal in VOLUME_SIGNALS:
                    if clue.category is not None:
                        raise ValueError(f"causes.{cause}: {clue.signal} has no categories")
                    continue
                signal = self.signals.get(clue.signal)
                if signal is None:
                    raise ValueError(f"causes.{cause}: no signal {clue.signal!r}")
                if clue.category is not None and clue.category not in signal.categories():
                    raise ValueError(
                        f"causes.{cause}: {clue.signal} counts no {clue.category!r} events"
                    )
            for step in rule.ladder:
                if step.action not in self.actions:
                    raise ValueError(f"causes.{cause}: no action {step.action!r} in actions")
            actions = [s.action for s in rule.ladder]
            if len(actions) != len(set(actions)):
                raise ValueError(f"causes.{cause}: an action appears twice in the ladder")
        return self


class DegradationTriageRunbook(ProcedureRunbook):
    kind: Literal["degradation-triage"]
    spec: TriageSpec
