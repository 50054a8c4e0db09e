"""Typed shapes of the Protocol's data files; unknown fields are refused everywhere."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Strict):
    """Where a number or rule comes from, so an operator can check it."""

    title: str
    url: HttpUrl


class DkimSigningSpec(Strict):
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/simple"]
    rsa_bits: Literal[2048, 3072, 4096] = 2048
    sign_ed25519: bool = True
    # Signed when present, in this order (RFC 6376 §5.4.1 recommended set plus extras).
    headers: list[str] = Field(min_length=1)
    # Listed once more in h= so a second instance added in transit breaks the signature.
    oversign: list[str] = Field(default_factory=list)
    selector_format: str = Field(
        description="strftime pattern plus {algorithm}, e.g. 'ax{algorithm}%Y%m'",
        pattern=r"\{algorithm\}",
    )


class RunbookBase(Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9-]{1,62}$")
    version: str = Field(pattern=r"^\d+(\.\d+){0,2}$")
    title: str
    description: str = ""
    sources: list[Source] = Field(default_factory=list)


class DkimSigningRunbook(RunbookBase):
    kind: Literal["dkim-signing"]
    spec: DkimSigningSpec


Runbook = Annotated[DkimSigningRunbook, Field(discriminator="kind")]
