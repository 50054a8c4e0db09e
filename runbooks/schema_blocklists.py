"""Typed shape of runbooks/blocklists.yaml: every DNS blocklist the Protocol asks, what its
answers mean, how a listing goes away, and which providers consult it."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from runbooks.schema import RunbookBase, Source, Strict
from runbooks.schema_protocol import KIND_PATTERN, ProcedureRunbook

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def _code(value: str, where: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not an IPv4 address") from None
    if address not in LOOPBACK:
        raise ValueError(f"{where}: return code {value} is not in 127.0.0.0/8")
    return value


class Part(Strict):
    """A component zone answering its part of the list's listings (ZEN's sbl, xbl, pbl)."""

    zone: str
    codes: list[str] = Field(min_length=1)


class Removal(Strict):
    url: str
    procedure: str = Field(description="What to do, in the list's own terms")
    expires_hours: int | None = Field(
        default=None,
        ge=1,
        description="A listing goes away by itself this long after the last report: wait",
    )


class Blocklist(Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    name: str
    zone: str
    dqs_zone: str | None = Field(
        default=None, description="With a key ({key}): the Data Query Service zone instead"
    )
    kind: Literal["ip", "domain"]
    codes: dict[str, str] = Field(min_length=1, description="Listing code -> its meaning")
    errors: dict[str, str] = Field(
        default_factory=dict,
        description="Codes that mean the query failed; any code in neither map is an error too",
    )
    parts: list[Part] = Field(default_factory=list)
    txt: str = Field(default="", description="The TXT reason the sandbox serves ({subject})")
    removal: Removal
    consulted_by: list[str] = Field(description="Providers (providers.yaml) known to consult it")
    sources: list[Source] = Field(min_length=1)

    @model_validator(mode="after")
    def _codes(self) -> Blocklist:
        for code in self.codes:
            _code(code, f"{self.id}.codes")
        for code in self.errors:
            _code(code, f"{self.id}.errors")
            if code in self.codes:
                raise ValueError(f"{self.id}: {code} is both a listing and an error")
        for part in self.parts:
            for code in part.codes:
                if code not in self.codes:
                    raise ValueError(f"{self.id}.parts.{part.zone}: {code} is not one of its codes")
        if self.dqs_zone is not None and "{key}" not in self.dqs_zone:
            raise ValueError(f"{self.id}.dqs_zone must contain {{key}}")
        return self

    def meaning(self, code: str) -> tuple[Literal["listed", "error"], str]:
        """What one A record says: a listing with its meaning, or an error with why."""
        if code in self.codes:
            return "listed", self.codes[code]
        if code in self.errors:
            return "error", self.errors[code]
        return "error", f"{code} is not a code {self.name} documents"

    def query_zone(self, dqs_key: str | None) -> str:
        if dqs_key and self.dqs_zone:
            return self.dqs_zone.format(key=dqs_key)
        return self.zone


class BlocklistsSpec(Strict):
    lists: list[Blocklist] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> BlocklistsSpec:
        ids = [b.id for b in self.lists]
        zones = [b.zone for b in self.lists] + [p.zone for b in self.lists for p in b.parts]
        if len(ids) != len(set(ids)) or len(zones) != len(set(zones)):
            raise ValueError("list ids and zones must be unique")
        return self

    def by_id(self, list_id: str) -> Blocklist:
        for b in self.lists:
            if b.id == list_id:
                return b
        raise KeyError(list_id)

    def consulted_by(self, list_id: str) -> list[str]:
        return self.by_id(list_id).consulted_by


class BlocklistsRunbook(RunbookBase):
    """Not a procedure: the lists every blocklist runbook, the CLI and the sandbox read."""

    kind: Literal["blocklists"]
    spec: BlocklistsSpec


# --- the procedures ---------------------------------------------------------------------


class BlocklistScanSpec(Strict):
    timeout_seconds: float = Field(gt=0, le=30, description="Per DNS question")
    concurrency: int = Field(ge=1, le=1024, description="DNS questions in flight at once")
    protect_hours: int = Field(
        ge=1,
        description=(
            "A listed IP's suspension at the providers that consult the list lasts this long; "
            "every scan that still sees the listing renews it, so it ends by itself"
        ),
    )
    error_cause: str = Field(description="The incident cause of a list answering errors")


class BlocklistScanRunbook(ProcedureRunbook):
    kind: Literal["blocklist-scan"]
    spec: BlocklistScanSpec


class BlocklistDelistingSpec(Strict):
    fixed_checkpoint: str = Field(pattern=KIND_PATTERN)
    requested_checkpoint: str = Field(pattern=KIND_PATTERN)
    evidence_hours: int = Field(ge=1, description="The IP's traffic shown as evidence")
    watch_seconds: int = Field(ge=60, description="How often the state is looked at again")
    deadline_days: int = Field(ge=1, description="Still listed after this: escalate")
    incident_cause: str


class BlocklistDelistingRunbook(ProcedureRunbook):
    kind: Literal["blocklist-delisting"]
    spec: BlocklistDelistingSpec
