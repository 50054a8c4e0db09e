"""Column helpers shared by the tables: UTC timestamps and JSON evidence."""

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime
from sqlmodel import Field


def utcnow() -> datetime:
    return datetime.now(UTC)


def created_at_field() -> datetime:
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), nullable=False)


def timestamp_field(*, index: bool = False, nullable: bool = True) -> datetime | None:
    return Field(default=None, sa_type=DateTime(timezone=True), index=index, nullable=nullable)


def json_field() -> dict:
    return Field(default_factory=dict, sa_type=JSON, nullable=False)
