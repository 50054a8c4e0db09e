"""Typed shape of the IP warm-up runbook (runbooks/ip-warmup.yaml): plans of daily volume per
stage, per-provider shares, how a day's volume spreads over its hours, and the conditions to
advance, hold or step back. runbooks/warmup.py turns a plan and a stage into caps; the relay
enforces them (relay/delivery/egress.py) and protocol/warmup.py decides the next stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from runbooks.schema import Strict
from runbooks.schema_protocol import KIND_PATTERN, ProcedureRunbook

PROVIDER_PATTERN = r"^([a-z][a-z0-9-]*|\*)$"


class ShareStep(Strict):
    """A provider's share of a stage's volume up to a stage (a smaller share early on)."""

    until_stage: int = Field(ge=1, description="Applies to stages 1..until_stage")
    share: float = Field(ge=0, le=1)


class Spread(Strict):
    """How a day's cap opens over its hours (UTC): by the end of hour first_hour + n, the
    fraction (n + 1) / hours of the day's cap may have been sent; the whole cap from the last
    hour on. hours: 1 opens the whole day at first_hour."""

    first_hour: int = Field(default=0, ge=0, le=23)
    hours: int = Field(default=24, ge=1, le=24)

    @model_validator(mode="after")
    def _within_day(self) -> Spread:
        if self.first_hour + self.hours > 24:
            raise ValueError("first_hour + hours must end within the day (24)")
        return self


class Plan(Strict):
    description: str
    source: str = Field(description="Where the numbers come from, or 'sandbox choice'")
    stages: list[int] = Field(
        min_length=1,
        description=(
            "Daily volume per IP for each provider, one per sending day at that stage; the "
            "plan is complete after the last"
        ),
    )
    shares: dict[str, list[ShareStep]] = Field(
        default_factory=dict,
        description="Per provider (providers.yaml name): its share of a stage's volume, by stage",
    )
    spread: Spread = Field(default_factory=Spread)
    overflow: Literal["fallback", "wait"] = Field(
        default="fallback",
        description="Mail above a cap: to the stream's warm fallback pool, or wait for room",
    )

    @model_validator(mode="after")
    def _rising(self) -> Plan:
        if any(b < a for a, b in zip(self.stages, self.stages[1:], strict=False)):
            raise ValueError("stages must not fall")
        for provider, steps in self.shares.items():
            ends = [s.until_stage for s in steps]
            if ends != sorted(set(ends)):
                raise ValueError(f"shares.{provider}: until_stage must rise")
        return self


class Judgement(Strict):
    """The conditions on one provider's day at one IP (protocol/warmup.py decide)."""

    advance_min_fill: float = Field(
        gt=0, le=1, description="Share of the day's cap sent for the day to count as progress"
    )
    min_sent_to_judge: int = Field(
        ge=1, description="Fewer attempts than this at a provider in a day: too little to judge"
    )
    yellow_rate_limited: float = Field(
        gt=0, le=1, description="Deferrals for rate limiting / attempts: hold that provider"
    )
    yellow_reputation: float = Field(
        gt=0, le=1, description="Deferrals for reputation / attempts: hold that provider"
    )
    red_blocked: float = Field(
        gt=0, le=1, description="Refusals for blocking or blocklisting / attempts: pause the IP"
    )
    red_hard_bounce: float = Field(gt=0, le=1, description="Hard bounces / final answers")
    red_complaint: float = Field(gt=0, le=1, description="Complaints / delivered")
    min_delivered_for_complaints: int = Field(
        ge=1, description="Below this many delivered, complaints are noise, not a rate"
    )
    patience_days: int = Field(
        ge=1, description="Calendar days without progress before a person is asked"
    )
    step_back_stages: int = Field(ge=1, description="How far 'step back' goes")


class DomainWarmup(Strict):
    plan: str = Field(description="The plan a new sending domain follows")
    history_days: int = Field(
        ge=1, description="A domain with no delivery in this many days has no history"
    )


class IpWarmupSpec(Strict):
    start_checkpoint: str = Field(pattern=KIND_PATTERN)
    review_checkpoint: str = Field(pattern=KIND_PATTERN)
    complete_checkpoint: str = Field(pattern=KIND_PATTERN)
    default_plan: str
    rewarm_plan: str
    rewarm_after_idle_days: int = Field(ge=1)
    pool_plans: dict[str, str] = Field(
        default_factory=dict, description="Pool name → plan, instead of default_plan"
    )
    providers: list[str] = Field(
        min_length=1,
        description="Providers that get their own cap each day; the rest share the '*' cap",
    )
    judgement: Judgement
    domain: DomainWarmup
    candidate_header: str = Field(
        pattern=r"^X-[A-Za-z0-9-]+$",
        description="Marks a message as a warm-up candidate (engaged recipient); removed "
        "before signing",
    )
    plans: dict[str, Plan] = Field(min_length=1)

    @model_validator(mode="after")
    def _plans_exist(self) -> IpWarmupSpec:
        named = {
            "default_plan": self.default_plan,
            "rewarm_plan": self.rewarm_plan,
            "domain.plan": self.domain.plan,
            **{f"pool_plans.{k}": v for k, v in self.pool_plans.items()},
        }
        for where, plan in named.items():
            if plan not in self.plans:
                raise ValueError(f"{where}: no plan {plan!r} in plans")
        return self


class IpWarmupRunbook(ProcedureRunbook):
    kind: Literal["ip-warmup"]
    spec: IpWarmupSpec
