"""A warm-up plan's arithmetic, shared by the relay (which enforces caps) and the control plane
(which advances stages): the cap of a stage for a provider, and how much of a day's cap has
opened by a given moment. Pure functions of runbooks/ip-warmup.yaml; no I/O, no clock."""

from __future__ import annotations

import math
from datetime import datetime

from runbooks.schema_warmup import Plan, Spread

ALL_PROVIDERS = "*"


def share_of(plan: Plan, provider: str, stage: int) -> float:
    """The provider's share of the stage's volume: the first share step that covers the stage,
    else all of it."""
    for step in plan.shares.get(provider, []):
        if stage <= step.until_stage:
            return step.share
    return 1.0


def cap_for(plan: Plan, provider: str, stage: int) -> int:
    """Messages the provider may receive from the subject on a day at this stage (1-based).
    Past the last stage the last stage's volume holds until a person declares the subject
    warm (warmup.complete): a plan never lifts its own caps."""
    volume = plan.stages[min(max(stage, 1), len(plan.stages)) - 1]
    return int(volume * share_of(plan, provider, stage))


def day_caps(plan: Plan, stages: dict[str, int], providers: list[str]) -> dict[str, int]:
    """One cap per named provider and one ("*") for every other, at each one's stage (a
    provider without a stage of its own is at the "*" stage)."""
    default = stages.get(ALL_PROVIDERS, 1)
    return {p: cap_for(plan, p, stages.get(p, default)) for p in [*providers, ALL_PROVIDERS]}


def opened(cap: int, spread: Spread, now: datetime) -> int:
    """How much of a day's cap may have been sent by `now` (UTC): nothing before first_hour,
    then one more hours-th each hour, the whole cap from the window's last hour on. Spreading
    the day keeps a warming IP from sending its day in the first minutes, which receivers see
    as a burst (SendGrid's warm-up caps by the hour)."""
    hour = now.hour - spread.first_hour
    if hour < 0:
        return 0
    if hour + 1 >= spread.hours:
        return cap
    return math.ceil(cap * (hour + 1) / spread.hours)
