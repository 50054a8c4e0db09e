"""Sending domains, their onboarding state, return path and DKIM keys (private keys encrypted
at rest)."""

from datetime import datetime
from enum import StrEnum

from sqlmodel import Field, SQLModel

from models.base import created_at_field, json_field, timestamp_field


class DomainState(StrEnum):
    pending = "pending"
    active = "active"
    suspended = "suspended"
    retired = "retired"


class KeyState(StrEnum):
    pending = "pending"
    active = "active"
    retired = "retired"


class Domain(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    name: str = Field(unique=True, index=True, max_length=253)
    state: DomainState = DomainState.pending
    dns_checks: dict = json_field()
    activated_at: datetime | None = timestamp_field()
    # The customer's return-path subdomain (e.g. bounces.shop.example): its MX names the relay's
    # inbound listener and its SPF the relay's IPs, so a DMARC check finds SPF aligned with the
    # From domain. Used in MAIL FROM only once published_at is set; until then the relay's own
    # bounce domain is used and DMARC passes through DKIM alone (relay/delivery/return_path.py).
    return_path_domain: str | None = Field(default=None, max_length=253)
    return_path_published_at: datetime | None = timestamp_field()
    created_at: datetime = created_at_field()


class DkimKey(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    domain_id: int = Field(foreign_key="domain.id", index=True)
    selector: str = Field(max_length=63)
    algorithm: str = Field(max_length=16)  # "rsa" | "ed25519" (the DNS k= tag)
    private_key_encrypted: bytes  # Fernet token of the PEM / base64 seed
    public_key: str  # the p= value as published
    state: KeyState = KeyState.pending
    created_at: datetime = created_at_field()
