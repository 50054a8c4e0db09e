"""Sending domains, their onboarding state, return path and DKIM keys (private keys encrypted
at rest)."""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field, timestamp_field


class DomainState(StrEnum):
    pending = "pending"
    active = "active"
    suspended = "suspended"
    retired = "retired"


class KeyState(StrEnum):
    """pending (published, not signing) → active (signing) → retiring (not signing, still
    published so mail in flight verifies: the rotation's overlap) → retired (withdrawn)."""

    pending = "pending"
    active = "active"
    retiring = "retiring"
    retired = "retired"


class Domain(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    name: str = Field(unique=True, index=True, max_length=253)
    state: DomainState = DomainState.pending
    dns_checks: dict = json_field()  # the last check of its DNS (protocol/dns_checks.py)
    dns_checked_at: datetime | None = timestamp_field()
    activated_at: datetime | None = timestamp_field()
    # The customer's return-path subdomain (e.g. bounces.shop.example): its MX names the relay's
    # inbound listener and its SPF the relay's IPs, so a DMARC check finds SPF aligned with the
    # From domain. Used in MAIL FROM only once published_at is set; until then the relay's own
    # bounce domain is used and DMARC passes through DKIM alone (relay/delivery/return_path.py).
    return_path_domain: str | None = Field(default=None, max_length=253)
    return_path_published_at: datetime | None = timestamp_field()
    created_at: datetime = created_at_field()


class DkimKey(SQLModel, table=True):
    # A selector names one key for ever: a receiver caching a record must never find another
    # key under it (selectors carry a date and a counter, relay/submission/dkim.py).
    __table_args__ = (UniqueConstraint("domain_id", "selector"),)

    id: int | None = Field(default=None, primary_key=True)
    domain_id: int = Field(foreign_key="domain.id", index=True)
    selector: str = Field(max_length=63)
    algorithm: str = Field(max_length=16)  # "rsa" | "ed25519" (the DNS k= tag)
    private_key_encrypted: bytes  # Fernet token of the PEM / base64 seed
    public_key: str  # the p= value as published
    state: KeyState = KeyState.pending
    activated_at: datetime | None = timestamp_field()
    retire_at: datetime | None = timestamp_field()  # retiring: withdrawn after the overlap
    created_at: datetime = created_at_field()
