"""What happened to mail: every delivery outcome, every decision not to send now, their hourly
roll-up, and who must not be mailed again.

The runbooks read these tables by time window and subject (a source IP, a provider, a From
domain, a tenant's stream), so each such subject has an index that starts with it and ends with
the time. Raw events are kept for the retention period of runbooks/events-retention.yaml and
rolled up per hour and subject before they go (protocol/signals.py).
"""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field


class EventKind(StrEnum):
    attempt = "attempt"  # a delivery attempt's outcome, as the receiving MX replied
    bounce = "bounce"  # an asynchronous bounce (a DSN or a plain-text report) that came back
    complaint = "complaint"  # a feedback-loop report (ARF) about a delivered message


class DeliveryEvent(SQLModel, table=True):
    __table_args__ = (
        Index("ix_deliveryevent_at", "at"),
        Index("ix_deliveryevent_ip_at", "source_ip", "at"),
        Index("ix_deliveryevent_provider_at", "provider", "at"),
        Index("ix_deliveryevent_domain_at", "from_domain", "at"),
        Index("ix_deliveryevent_stream_at", "tenant_id", "stream", "at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = created_at_field()
    kind: str = Field(default=EventKind.attempt, max_length=16)
    # Copied from the message when the event is written: a window query reads one table.
    tenant_id: int | None = None
    stream: str | None = Field(default=None, max_length=64)
    from_domain: str | None = Field(default=None, max_length=253)
    message_id: str = Field(index=True, max_length=26)
    recipient_id: int | None = Field(default=None, index=True)
    recipient: str = Field(max_length=512)
    attempt: int | None = None  # 1 for the first attempt; None for bounces and complaints
    source_ip: str | None = Field(default=None, max_length=45)
    provider: str | None = Field(default=None, max_length=32)
    mx_host: str | None = Field(default=None, max_length=253)
    reply_code: int | None = None
    enhanced_code: str | None = Field(default=None, max_length=16)
    reply_text: str | None = Field(default=None, max_length=2000)
    category: str = Field(max_length=32)
    permanent: bool = False
    action: str | None = Field(default=None, max_length=64)
    latency_ms: int | None = None


class HoldReason(StrEnum):
    """Why the relay did not send a due recipient now (no attempt, no attempt counted)."""

    paused = "paused"  # the tenant's sending is paused by an operator
    held = "held"  # the stream is in the hold pool (suspend-stream)
    suspended = "suspended"  # every usable source IP is suspended for the provider
    capped = "capped"  # every usable source IP reached its warm-up cap for the provider today
    paced = "paced"  # the path's pace puts the next send further away than a short wait
    no_ip = "no_ip"  # no pool, or a pool without a usable IP


class HoldTally(SQLModel, table=True):
    """Recipients not sent now, counted per interval, reason and subject. Held mail is looked
    at again every few minutes, so one row per wait would grow with the wait, not the mail:
    each look adds 1 to its interval's row (an upsert keyed by the unique columns)."""

    __tablename__ = "hold_tally"
    __table_args__ = (
        UniqueConstraint(
            "interval_start", "reason", "tenant_id", "stream", "provider", "source_ip"
        ),
        Index("ix_hold_tally_stream_at", "tenant_id", "stream", "interval_start"),
    )
    id: int | None = Field(default=None, primary_key=True)
    interval_start: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    reason: str = Field(max_length=16)
    tenant_id: int
    stream: str = Field(max_length=64)
    provider: str = Field(default="", max_length=32)  # "" when not known (paused before MX)
    source_ip: str = Field(default="", max_length=45)  # "" when no IP was picked
    count: int = 0
    last_detail: str = Field(default="", max_length=500)  # the latest wait reason, as text


# What one roll-up row is per hour for: its subject and outcome (the unique key after the hour;
# protocol/signals.py writes these columns from raw events).
ROLLUP_KEY = (
    "kind",
    "tenant_id",
    "stream",
    "from_domain",
    "source_ip",
    "provider",
    "category",
    "permanent",
)


class EventRollup(SQLModel, table=True):
    """Events per hour and subject, written before raw events are deleted: a year of history
    stays small and the 7-day baselines and trends remain queryable."""

    __tablename__ = "event_rollup"
    __table_args__ = (
        UniqueConstraint("hour", *ROLLUP_KEY),
        Index("ix_event_rollup_hour", "hour"),
    )
    id: int | None = Field(default=None, primary_key=True)
    hour: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    kind: str = Field(max_length=16)
    # "" / 0 stand for "not known" so that the unique key matches (NULLs never compare equal).
    tenant_id: int = 0
    stream: str = Field(default="", max_length=64)
    from_domain: str = Field(default="", max_length=253)
    source_ip: str = Field(default="", max_length=45)
    provider: str = Field(default="", max_length=32)
    category: str = Field(max_length=32)
    permanent: bool = False
    count: int = 0


class SubjectRollup(SQLModel, table=True):
    """Events per hour and subject of one kind (by: provider, ip, domain or stream), written
    with the hour's EventRollup rows. Those are keyed by every subject at once, so an hour has
    nearly as many of them as it has events (a From domain times its IPs times the providers);
    a window per provider or IP reads only its own, far fewer rows here. The index holds every
    column a window reads (protocol/signals.py), so the reads never visit the table.

    No unique key of its own: the hour's EventRollup rows are written in the same transaction,
    and their unique key makes a second roll-up of the hour fail as a whole."""

    __tablename__ = "event_rollup_subject"
    __table_args__ = (
        Index(
            "ix_event_rollup_subject_read",
            "by",
            "hour",
            "tenant_id",
            "subject",
            "kind",
            "category",
            "permanent",
            "count",
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    by: str = Field(max_length=8)  # provider | ip | domain | stream
    hour: datetime = Field(sa_type=DateTime(timezone=True), nullable=False)
    tenant_id: int = 0  # the stream's tenant; 0 for the other kinds and when not known
    subject: str = Field(default="", max_length=253)  # "" when not known, as in EventRollup
    kind: str = Field(max_length=16)
    category: str = Field(max_length=32)
    permanent: bool = False
    count: int = 0


class Suppression(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("tenant_id", "address"),)
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    address: str = Field(max_length=512)
    reason: str = Field(max_length=255)  # e.g. "hard bounce: 550 5.1.1 ..." or "complaint"
    source: str = Field(default="operator", max_length=32)
    created_at: datetime = created_at_field()
