"""The durable spool: one Message row (envelope + signed bytes) and a row per recipient."""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Index, LargeBinary
from sqlmodel import Field, SQLModel

from models.base import created_at_field, timestamp_field


class RecipientState(StrEnum):
    queued = "queued"  # waiting for its next attempt
    delivered = "delivered"
    bounced = "bounced"  # permanent failure; a DSN went to the sender
    expired = "expired"  # retried until the maximum age; a DSN went to the sender


class Message(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=26)  # sortable queue id
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    stream: str = Field(default="transactional", max_length=64)
    mail_from: str = Field(max_length=512)
    header_from_domain: str = Field(max_length=253)
    message_id_header: str = Field(default="", max_length=998)
    size: int
    data: bytes = Field(sa_type=LargeBinary)  # the message exactly as it will be sent
    client_address: str = Field(default="", max_length=64)
    auth_user: str | None = Field(default=None, max_length=128)
    # The customer marked it for an engaged recipient (runbooks/ip-warmup.yaml
    # candidate_header): warming IPs and domains prefer it.
    warmup_candidate: bool = False
    created_at: datetime = created_at_field()


class Recipient(SQLModel, table=True):
    __table_args__ = (Index("ix_recipient_due", "state", "next_attempt_at"),)
    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(foreign_key="message.id", index=True, max_length=26)
    address: str = Field(max_length=512)
    domain: str = Field(max_length=253, index=True)
    state: RecipientState = RecipientState.queued
    attempts: int = 0
    next_attempt_at: datetime | None = timestamp_field()
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = timestamp_field()
    last_reply: str | None = Field(default=None, max_length=1000)
    updated_at: datetime | None = timestamp_field()
