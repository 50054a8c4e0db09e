"""Typed shapes of the domain runbooks: the DNS records a customer publishes, onboarding with
its pool rule, DKIM key rotation and the daily health check of every domain's DNS."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, model_validator

from runbooks.schema import RunbookBase, Strict
from runbooks.schema_protocol import KIND_PATTERN, ProcedureRunbook

RecordKind = Literal["dkim", "spf", "dmarc", "return_path_mx", "return_path_spf"]

# What a record template may name: str.format fields, filled by runbooks/records.py.
DOMAIN_FIELDS = {"domain", "relay_hostname", "dmarc_address", "return_path", "inbound_host"}
KEY_FIELDS = DOMAIN_FIELDS | {"selector", "algorithm", "public_key"}


class RecordTemplate(Strict):
    kind: RecordKind
    per: Literal["domain", "key"] = Field(
        default="domain", description="key: one record per published DKIM key"
    )
    name: str
    type: Literal["TXT", "MX", "CNAME"]
    value: str
    purpose: str = Field(description="Shown beside the record to the customer")

    @model_validator(mode="after")
    def _known_fields(self) -> RecordTemplate:
        allowed = KEY_FIELDS if self.per == "key" else DOMAIN_FIELDS
        for text in (self.name, self.value, self.purpose):
            used = {f for _, f, _, _ in string.Formatter().parse(text) if f}
            unknown = sorted(used - allowed)
            if unknown:
                raise ValueError(f"unknown field {{{unknown[0]}}} in {text!r}")
        return self


class DnsRecordsSpec(Strict):
    records: list[RecordTemplate] = Field(min_length=1)

    @model_validator(mode="after")
    def _every_kind_once(self) -> DnsRecordsSpec:
        kinds = [r.kind for r in self.records]
        if sorted(kinds) != sorted(set(kinds)) or len(set(kinds)) != 5:
            raise ValueError("one template for each of dkim, spf, dmarc, return_path_mx/_spf")
        return self


class DnsRecordsRunbook(RunbookBase):
    """Not a procedure: the records every domain runbook, the CLI, the Slack message, the
    customer's email and the sandbox DNS render alike."""

    kind: Literal["dns-records"]
    spec: DnsRecordsSpec


# --- domain onboarding ------------------------------------------------------------------


class PoolRule(Strict):
    """The Protocol's dedicated-or-shared rule (protocol/onboarding.py decide_pool)."""

    dedicated_min_per_month: int = Field(
        ge=1, description="Declared messages a month from which a dedicated IP is proposed"
    )
    regular_min_days_per_week: int = Field(
        ge=1, le=7, description="Sending days a week that count as regular sending"
    )
    separate_min_per_month: int = Field(
        ge=1,
        description=(
            "Declared monthly volume of the tenant from which marketing and transactional get "
            "dedicated pools of their own"
        ),
    )
    shared_pools: dict[Literal["transactional", "marketing", "mixed"], str] = Field(
        description="The shared pool each stream kind is bound to"
    )
    dedicated_pool_format: str = Field(
        default="dedicated-{tenant}",
        description="Name of a tenant's dedicated pool; {kind} is appended when separated",
    )
    risky_list_sources: list[str] = Field(
        default_factory=list, description="List sources the approver is warned about"
    )
    stale_list_months: int = Field(
        ge=1, description="A list older than this gets a warning (expect hard bounces)"
    )

    @model_validator(mode="after")
    def _ordered(self) -> PoolRule:
        if self.separate_min_per_month < self.dedicated_min_per_month:
            raise ValueError("separate_min_per_month must be at least dedicated_min_per_month")
        return self


class DomainOnboardingSpec(Strict):
    checkpoint: str = Field(pattern=KIND_PATTERN)
    recheck_seconds: int = Field(
        ge=60, le=86400, description="While records are missing, DNS is checked again this often"
    )
    deadline_days: int = Field(
        ge=1, le=90, description="Past this the domain stays pending and the customer is told"
    )
    return_path_label: str = Field(
        pattern=r"^[a-z0-9-]{1,63}$", description="The return-path subdomain: <label>.<domain>"
    )
    pool_rule: PoolRule


class DomainOnboardingRunbook(ProcedureRunbook):
    kind: Literal["domain-onboarding"]
    spec: DomainOnboardingSpec

    @model_validator(mode="after")
    def _asks_a_declared_checkpoint(self) -> DomainOnboardingRunbook:
        if self.spec.checkpoint not in self.checkpoints:
            raise ValueError(f"spec.checkpoint {self.spec.checkpoint} is not in checkpoints")
        return self


# --- DKIM key rotation ------------------------------------------------------------------


class DkimRotationSpec(Strict):
    checkpoint: str = Field(pattern=KIND_PATTERN)
    rotate_after_days: int = Field(
        ge=7, le=3650, description="Keys signing for this long are rotated by the schedule"
    )
    overlap_days: int = Field(
        ge=1,
        le=90,
        description="Old public keys stay published this long after the new keys sign",
    )
    recheck_seconds: int = Field(ge=60, le=86400)
    deadline_days: int = Field(ge=1, le=90)
    max_per_run: int = Field(
        ge=1, le=1000, description="Domains a scheduled run starts rotating at most"
    )


class DkimRotationRunbook(ProcedureRunbook):
    kind: Literal["dkim-rotation"]
    spec: DkimRotationSpec

    @model_validator(mode="after")
    def _asks_a_declared_checkpoint(self) -> DkimRotationRunbook:
        if self.spec.checkpoint not in self.checkpoints:
            raise ValueError(f"spec.checkpoint {self.spec.checkpoint} is not in checkpoints")
        return self


# --- domain health ----------------------------------------------------------------------


class DomainHealthSpec(Strict):
    dmarc_window_days: int = Field(
        ge=1, le=30, description="DMARC aggregate reports looked at, back from now"
    )
    dmarc_min_messages: int = Field(
        ge=1, description="Messages from our IPs failing DMARC at a reporter before it counts"
    )
    dmarc_max_fail_rate: float = Field(
        ge=0, le=1, description="Share of our messages failing DMARC that opens an incident"
    )


class DomainHealthRunbook(ProcedureRunbook):
    kind: Literal["domain-health"]
    spec: DomainHealthSpec
