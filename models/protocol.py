"""Protocol state: automatic suspensions, operators and approval checkpoints."""

from datetime import datetime

from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field, timestamp_field


class Suspension(SQLModel, table=True):
    """A protective, time-bounded stop or slow-down of one (IP, provider) path."""

    id: int | None = Field(default=None, primary_key=True)
    source_ip: str = Field(max_length=45, index=True)
    provider: str = Field(max_length=32, index=True)
    action: str = Field(max_length=32)  # "suspend" | "throttle"
    limit_per_minute: int | None = None
    reason: str = Field(max_length=1000)
    rule_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = created_at_field()
    expires_at: datetime = Field(index=True)


class Operator(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    roles: str = Field(default="", max_length=255)  # comma-separated
    slack_user_id: str | None = Field(default=None, unique=True, max_length=32)
    created_at: datetime = created_at_field()


class Approval(SQLModel, table=True):
    """One checkpoint request; pending → approved | rejected | expired, exactly once."""

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=255)
    proposal: dict = json_field()
    evidence: dict = json_field()
    allowed_roles: str = Field(default="", max_length=255)
    safe_default: str = Field(default="do_nothing", max_length=64)
    runbook_id: str | None = Field(default=None, max_length=64)
    runbook_version: str | None = Field(default=None, max_length=32)
    flow_run_id: str | None = Field(default=None, max_length=64)
    state: str = Field(default="pending", max_length=16, index=True)
    decided_by: str | None = Field(default=None, max_length=64)
    decided_via: str | None = Field(default=None, max_length=16)
    comment: str | None = None
    slack_channel: str | None = Field(default=None, max_length=32)
    slack_ts: str | None = Field(default=None, max_length=32)
    created_at: datetime = created_at_field()
    expires_at: datetime
    decided_at: datetime | None = timestamp_field()
