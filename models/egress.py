"""Where mail leaves from: IP pools, their addresses, tenant streams and warm-up plans."""

from datetime import date, datetime
from enum import StrEnum

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field, timestamp_field

# The pool a held stream is bound to (suspend-stream): it has no IPs, so its mail waits.
HOLD_POOL = "hold"


class PoolKind(StrEnum):
    dedicated = "dedicated"
    shared = "shared"


class IpState(StrEnum):
    cold = "cold"
    warming = "warming"
    active = "active"
    suspended = "suspended"
    listed = "listed"
    retired = "retired"


class IpPool(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    kind: PoolKind = PoolKind.shared
    created_at: datetime = created_at_field()


class IpAddress(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(unique=True, index=True, max_length=45)
    pool_id: int = Field(foreign_key="ippool.id", index=True)
    ptr_name: str | None = Field(default=None, max_length=253)
    weight: int = Field(default=100, ge=0)
    state: IpState = IpState.cold
    created_at: datetime = created_at_field()


class StreamKind(StrEnum):
    transactional = "transactional"
    marketing = "marketing"
    mixed = "mixed"


class Stream(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    name: str = Field(max_length=64)
    pool_id: int = Field(foreign_key="ippool.id")
    fallback_pool_id: int | None = Field(default=None, foreign_key="ippool.id")
    # What the customer declared at onboarding (runbooks/domain-onboarding.yaml): the pool
    # decision reads it, and triage compares what the stream sends with it.
    kind: str | None = Field(default=None, max_length=16)  # StreamKind
    declared_per_day: int | None = Field(default=None, ge=0)
    declared_per_month: int | None = Field(default=None, ge=0)
    sending_days_per_week: int | None = Field(default=None, ge=0, le=7)
    list_source: str | None = Field(default=None, max_length=32)
    list_age_months: int | None = Field(default=None, ge=0)
    declared_at: datetime | None = timestamp_field()
    created_at: datetime = created_at_field()


class WarmupState(StrEnum):
    running = "running"  # caps rise stage by stage
    review = "review"  # the signals stopped it: caps stay, a person decides (warmup.review)
    paused = "paused"  # a person paused it: the subject sends nothing under this plan
    done = "done"  # declared warm: no caps
    cancelled = "cancelled"


# States whose caps the relay enforces (a paused plan's cap is 0).
CAPPED_STATES = ("running", "review", "paused")


class WarmupPlan(SQLModel, table=True):
    """A warm-up of one IP (ip_id) or one new sending domain (domain_id), on a plan of
    runbooks/ip-warmup.yaml; where it stands per provider is `stages` (provider -> stage,
    "*" for the rest), advanced per sending day by protocol/warmup.py."""

    id: int | None = Field(default=None, primary_key=True)
    ip_id: int | None = Field(default=None, foreign_key="ipaddress.id", index=True)
    domain_id: int | None = Field(default=None, foreign_key="domain.id", index=True)
    schedule_id: str = Field(max_length=64)  # the runbook plan it follows
    runbook_version: str = Field(max_length=32)
    started_on: date
    state: str = Field(default="running", max_length=16)  # WarmupState
    reason: str = Field(default="new", max_length=32)  # new, idle, delisted, domain
    stages: dict = json_field()  # provider -> stage (1-based)
    held: dict = json_field()  # provider -> why its stage holds
    # "marked": only messages carrying the candidate header use it; "all": every message,
    # marked ones first.
    candidates: str = Field(default="all", max_length=8)
    evaluated_on: date | None = None  # the last day judged
    progressed_on: date | None = None  # the last day a provider advanced (or the start)
    created_at: datetime = created_at_field()


class WarmupDay(SQLModel, table=True):
    """One day's cap for one (IP, provider) path and what was actually sent."""

    __table_args__ = (UniqueConstraint("plan_id", "day", "provider"),)
    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="warmupplan.id", index=True)
    day: date
    provider: str = Field(max_length=32)
    cap: int = Field(ge=0)
    sent: int = 0
    signals: dict = json_field()
