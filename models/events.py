"""What happened to mail: every delivery attempt, and who must not be mailed again."""

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field


class DeliveryEvent(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = created_at_field()
    message_id: str = Field(index=True, max_length=26)
    recipient_id: int | None = Field(default=None, index=True)
    recipient: str = Field(max_length=512)
    source_ip: str | None = Field(default=None, max_length=45)
    provider: str | None = Field(default=None, max_length=32, index=True)
    mx_host: str | None = Field(default=None, max_length=253)
    reply_code: int | None = None
    enhanced_code: str | None = Field(default=None, max_length=16)
    reply_text: str | None = Field(default=None, max_length=2000)
    category: str = Field(max_length=32, index=True)
    permanent: bool = False
    action: str | None = Field(default=None, max_length=64)
    latency_ms: int | None = None


class Suppression(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("tenant_id", "address"),)
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    address: str = Field(max_length=512)
    reason: str = Field(max_length=255)  # e.g. "hard bounce: 550 5.1.1 ..." or "complaint"
    source: str = Field(default="operator", max_length=32)
    created_at: datetime = created_at_field()
