"""Typed shapes of the delivery runbooks: retries, shaping per provider, protective reactions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from runbooks.schema import RunbookBase, Source, Strict


class RetrySchedule(Strict):
    first_retry_seconds: int = Field(ge=1)
    factor: float = Field(ge=1.0, le=10.0)
    max_interval_seconds: int = Field(ge=1)
    max_age_seconds: int = Field(ge=60)
    jitter: float = Field(ge=0.0, le=0.5, description="± share of the interval")


class DeliverySpec(Strict):
    retry: RetrySchedule
    lease_seconds: int = Field(ge=5, le=3600)
    claim_batch: int = Field(ge=1, le=5000)
    max_in_flight: int = Field(ge=1, le=100_000)
    connect_timeout_seconds: float = Field(gt=0, le=300)
    command_timeout_seconds: float = Field(gt=0, le=900)
    tls_broken_memory_seconds: int = Field(ge=0)
    # When every IP of a pool is capped or suspended, how long mail waits before trying again.
    capped_wait_seconds: int = Field(ge=1)
    dsn_from_local_part: str = Field(default="mailer-daemon", pattern=r"^[a-z0-9.-]+$")


class DeliveryRunbook(RunbookBase):
    kind: Literal["delivery"]
    spec: DeliverySpec


class PathLimits(Strict):
    """Limits for one (source IP, provider) path."""

    max_connections: int = Field(ge=1, le=1000)
    messages_per_connection: int = Field(ge=1, le=100_000)
    per_minute: int | None = Field(default=None, ge=1)
    per_hour: int | None = Field(default=None, ge=1)


class ProviderShaping(Strict):
    provider: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    limits: PathLimits
    source: Source


class ReactionTrigger(Strict):
    """Fire immediately, or when `count` matching replies arrive within `window_seconds`."""

    count: int = Field(default=1, ge=1)
    window_seconds: int = Field(default=3600, ge=1)


class ReactionRule(Strict):
    """reply pattern → trigger → action → duration (KumoMTA's automation shape)."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,62}$")
    provider: str = Field(default="any", pattern=r"^[a-z][a-z0-9-]*$")
    categories: list[str] = Field(default_factory=list)
    text: str | None = Field(default=None, description="regex, searched case-insensitively")
    trigger: ReactionTrigger = ReactionTrigger()
    action: Literal["suspend", "throttle"]
    # For throttle: the path's new per-minute limit while the reaction lasts.
    limit_per_minute: int | None = Field(default=None, ge=1)
    duration_seconds: int = Field(ge=60, le=7 * 86400)
    source: Source

    @field_validator("text")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> ReactionRule:
        if not self.categories and self.text is None:
            raise ValueError("a reaction needs categories, a text pattern, or both")
        if self.action == "throttle" and self.limit_per_minute is None:
            raise ValueError("a throttle reaction needs limit_per_minute")
        return self


class ShapingSpec(Strict):
    default: PathLimits
    providers: list[ProviderShaping]
    reactions: list[ReactionRule]

    @model_validator(mode="after")
    def _unique(self) -> ShapingSpec:
        names = [p.provider for p in self.providers]
        if len(names) != len(set(names)):
            raise ValueError("a provider is shaped twice")
        ids = [r.id for r in self.reactions]
        if len(ids) != len(set(ids)):
            raise ValueError("duplicate reaction ids")
        return self

    def limits_for(self, provider: str) -> PathLimits:
        for entry in self.providers:
            if entry.provider == provider:
                return entry.limits
        return self.default


class ShapingRunbook(RunbookBase):
    kind: Literal["shaping"]
    spec: ShapingSpec
