"""Customers, their SMTP credentials and the client networks bound to them."""

from datetime import datetime

from sqlmodel import Field, SQLModel

from models.base import created_at_field


class Tenant(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, min_length=1, max_length=64)
    language: str = Field(default="it", max_length=8)  # of the notices it is sent: it | en
    contact_email: str | None = Field(default=None, max_length=254)  # where notices go
    paused: bool = False
    created_at: datetime = created_at_field()


class Credential(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    username: str = Field(unique=True, index=True, min_length=1, max_length=128)
    password_hash: str  # argon2id; the password itself is never stored
    disabled: bool = False
    created_at: datetime = created_at_field()


class ClientNetwork(SQLModel, table=True):
    """A network whose connections act as the tenant without AUTH (Postfix's mynetworks)."""

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenant.id", index=True)
    cidr: str = Field(unique=True, max_length=64)
    created_at: datetime = created_at_field()
