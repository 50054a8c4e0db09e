"""The typed shape of sandbox/behaviour.yaml: providers, reputation arithmetic, DNSBL zones,
and where an accepted message lands (placement rules)."""

from __future__ import annotations

import ipaddress
import string
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from runbooks.schema import Source, Strict

BEHAVIOUR_FILE = Path(__file__).with_name("behaviour.yaml")
PLACEHOLDERS = {
    "ip",
    "rcpt",
    "rcpt_domain",
    "mail_from",
    "mail_from_domain",
    "from_domain",
    "mx_host",
    "zone",
    "txt",
    "ref",
}
ReplyKey = Literal[
    "accepted",
    "rate_limited",
    "rate_limited_cold",
    "rate_limited_warming",
    "rate_limited_established",
    "rate_limited_damaged",
    "blocked",
    "blocklisted",
    "dbl_listed",
    "tls_required",
    "no_ptr",
    "unauthenticated",
    "dmarc_reject",
    "bulk_unauthenticated",
    "bulk_spf",
    "bulk_dkim",
    "bulk_dmarc",
    "per_connection_limit",
    "unknown_mailbox",
]
REQUIRED_REPLIES = {"accepted", "rate_limited", "blocked", "unknown_mailbox", "dmarc_reject"}


class BehaviourError(Exception):
    """behaviour.yaml is wrong; the message names the field."""


class Reply(Strict):
    text: str
    source: Source
    note: str = ""

    @field_validator("text")
    @classmethod
    def _template(cls, value: str) -> str:
        if not (value[:3].isdigit() and value[0] in "245" and value[3:4] == " "):
            raise ValueError(f"must start with a 2xx/4xx/5xx code and a space: {value[:20]!r}")
        names = {field for _, field, _, _ in string.Formatter().parse(value) if field}
        unknown = names - PLACEHOLDERS
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}")
        return value

    @property
    def code(self) -> int:
        return int(self.text[:3])


class Feedback(Strict):
    """A feedback loop that sends ARF reports (RFC 5965), one per complaint."""

    envelope_from: str
    header_from: str
    user_agent: str
    include: Literal["message", "headers"]  # message/rfc822 or text/rfc822-headers
    delay_seconds: float = Field(ge=0, le=60)
    source: Source
    note: str = ""


class AuthPolicy(Strict):
    all_senders: Literal["none", "spf_or_dkim"]
    bulk_senders: Literal["none", "spf_and_dkim"]
    bulk_threshold_per_day: int | None = Field(ge=1)
    enforce_dmarc_reject: bool
    source: Source


class Provider(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    host: int = Field(ge=1, le=250, description="offset in AXIOM_SANDBOX_MX_NETWORK")
    greeting: str
    domains: list[str] = Field(min_length=1)
    mx: list[tuple[int, str]] = Field(min_length=1)
    accepts_customer_domains: bool = False
    require_tls: bool
    require_ptr: bool
    # From runbooks/blocklists.yaml (consulted_by), not from behaviour.yaml: the lists a
    # provider consults are the Protocol's data, so the world and the runbooks agree.
    dnsbl_zones: list[str] = Field(default_factory=list)
    dbl_zone: str | None = None
    messages_per_connection: int | None = Field(default=None, ge=1)
    messages_per_connection_source: Source | None = None
    auth: AuthPolicy
    unknown_mailbox_share: float = Field(ge=0, le=1)
    complaint_share: float = Field(ge=0, le=1)
    note: str = ""
    feedback: Feedback | None
    replies: dict[ReplyKey, Reply]

    @model_validator(mode="after")
    def _complete(self) -> Provider:
        missing = REQUIRED_REPLIES - set(self.replies)
        if self.dnsbl_zones:
            missing |= {"blocklisted"} - set(self.replies)
        if self.dbl_zone:
            missing |= {"dbl_listed"} - set(self.replies)
        if self.require_tls:
            missing |= {"tls_required"} - set(self.replies)
        if self.require_ptr:
            missing |= {"no_ptr"} - set(self.replies)
        if self.messages_per_connection:
            missing |= {"per_connection_limit"} - set(self.replies)
        if self.auth.all_senders != "none":
            missing |= {"unauthenticated"} - set(self.replies)
        if self.auth.bulk_senders != "none" and "bulk_unauthenticated" not in self.replies:
            missing |= {"bulk_spf", "bulk_dkim"} - set(self.replies)
        if missing:
            raise ValueError(f"provider {self.name}: replies missing {sorted(missing)}")
        return self

    def reply(self, key: str, **values: str) -> str:
        """The reply text for key with its placeholders filled (unknown ones left empty)."""
        return self.replies[key].text.format_map(_Blank(values))  # type: ignore[index]

    def has_reply(self, key: str) -> bool:
        return key in self.replies


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


class Tier(Strict):
    name: Literal["established", "warming", "cold", "damaged"]
    min_score: float
    per_minute: float = Field(gt=0)
    burst: int = Field(ge=1)


class SpamRate(Strict):
    limit: float = Field(gt=0, lt=1)
    window_seconds: int = Field(ge=60)
    min_volume: int = Field(ge=1)
    min_complaints: int = Field(ge=1)  # in the window before the rate counts
    source: Source


class Losses(Strict):
    rate_limited: float = Field(ge=0)
    over_allowance: float = Field(ge=0)
    unknown_mailbox: float = Field(ge=0)
    complaint: float = Field(ge=0)
    auth_failure: float = Field(ge=0)
    blocklisted: float = Field(ge=0)


class CleanDay(Strict):
    """What a sending day must look like to count toward an IP's history."""

    min_delivered: int = Field(ge=1)
    max_complaint_rate: float = Field(ge=0, lt=1)  # complaints per delivered message
    max_unknown_share: float = Field(ge=0, lt=1)  # of the day's recipients
    max_auth_failure_share: float = Field(ge=0, lt=1)
    max_deferred_share: float = Field(ge=0, lt=1)  # short-term (token bucket) deferrals


class Daily(Strict):
    """Volume per UTC day of the world's clock, judged against the IP's history."""

    cold_allowance: float = Field(gt=0)
    growth_per_clean_day: float = Field(gt=1)
    max_allowance: float = Field(gt=0)
    clean_day_gain: float = Field(gt=0)  # score points a clean day adds
    clean_day: CleanDay
    pushed_day_setback: float = Field(ge=0)  # clean days a pushed or blocked day takes away
    # The short-term bucket holds at least this share of today's allowance (sandbox/reputation.py).
    burst_share: float = Field(ge=0, le=1)
    push_block_factor: float = Field(gt=1)
    push_block_seconds: int = Field(ge=1)
    idle_grace_days: int = Field(ge=0)
    idle_half_life_days: float = Field(gt=0)
    note: str = ""

    def allowance(self, clean_days: float) -> float:
        """Messages a day a provider takes from an IP with this many clean sending days."""
        return min(self.max_allowance, self.cold_allowance * self.growth_per_clean_day**clean_days)


class ReputationModel(Strict):
    initial_score: float
    min_score: float
    max_score: float
    losses: Losses
    block_below: float
    block_seconds: int = Field(ge=1)
    # Points a day a score below initial_score recovers by itself once the abuse stops. (A
    # score above it cools only on idle days: `daily.idle_half_life_days`.)
    decay_per_day: float = Field(default=0.0, ge=0)
    tiers: list[Tier] = Field(min_length=1)
    daily: Daily
    note: str = ""
    spam_rate: SpamRate

    @model_validator(mode="after")
    def _ordered(self) -> ReputationModel:
        scores = [t.min_score for t in self.tiers]
        if scores != sorted(scores, reverse=True):
            raise ValueError("tiers must be ordered by min_score, highest first")
        if self.tiers[-1].min_score > self.min_score:
            raise ValueError("the last tier must cover min_score")
        if not self.min_score <= self.block_below < self.initial_score <= self.max_score:
            raise ValueError("expected min_score <= block_below < initial_score <= max_score")
        return self

    def tier_for(self, score: float) -> Tier:
        return next((t for t in self.tiers if score >= t.min_score), self.tiers[-1])


PlacementCondition = Literal[
    "dmarc_quarantine",  # DMARC fails and the From domain's policy is quarantine
    "unauthenticated",  # neither SPF nor DKIM passes
    "bulk_dmarc_not_passing",  # a bulk sender whose mail does not pass DMARC
    "ip_tier",  # the sending IP's standing at the provider is in `tier`
    "domain_tier",  # the From domain's standing at the provider is in `tier`
    "ip_complaint_rate",  # the IP's recent complaint rate at the provider reaches `at_least`
    "domain_complaint_rate",  # the From domain's recent complaint rate reaches `at_least`
]
TierName = Literal["established", "warming", "cold", "damaged"]


class PlacementRule(Strict):
    """When `when` holds for a message at one of `providers`, spam_share of such mail goes to
    spam. Every rule cites what a provider publishes (`source`), says why the sandbox decides
    where nothing is published (`choice`), or both (a published fact, our number)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    when: PlacementCondition
    providers: list[str] = Field(min_length=1)  # provider names, or ["*"] for every provider
    tier: TierName | None = None
    at_least: float | None = Field(default=None, gt=0, lt=1)
    spam_share: float = Field(ge=0, le=1)
    source: Source | None = None
    choice: str = ""

    @model_validator(mode="after")
    def _complete(self) -> PlacementRule:
        if self.source is None and not self.choice:
            raise ValueError(f"rule {self.name}: give a source, or say our choice (choice:)")
        needs_tier = self.when in ("ip_tier", "domain_tier")
        needs_rate = self.when in ("ip_complaint_rate", "domain_complaint_rate")
        if needs_tier != (self.tier is not None):
            raise ValueError(f"rule {self.name}: `tier` goes with ip_tier and domain_tier only")
        if needs_rate != (self.at_least is not None):
            raise ValueError(f"rule {self.name}: `at_least` goes with the complaint rates only")
        return self

    def applies_to(self, provider: str) -> bool:
        return "*" in self.providers or provider in self.providers


class ComplaintWindow(Strict):
    """How a placement rule reads a complaint rate: complaints over mail delivered to the inbox
    in the reputation's spam-rate window, counted only past these minimums."""

    min_inbox: int = Field(ge=1)
    min_complaints: int = Field(ge=1)
    # A From domain's rate is read over all its IPs' mail: counted from this much inbox mail
    # (None: min_inbox, as an IP's).
    domain_min_inbox: int | None = Field(default=None, ge=1)
    source: Source
    choice: str = ""


class Placement(Strict):
    complaints: ComplaintWindow
    # What moves a From domain's standing (sandbox/reputation.py, the same arithmetic as an
    # IP's). Only complaint and auth_failure events reach a domain.
    domain_losses: Losses
    domain_losses_choice: str
    rules: list[PlacementRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Placement:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("placement rule names must be unique")
        return self


class DnsblZone(Strict):
    zone: str
    kind: Literal["ip", "domain"]
    default_code: str | None = None
    codes: dict[str, str] = Field(default_factory=dict)  # return code -> meaning
    # Answers that are not listings (Spamhaus's 127.255.255.254, ...): `axiom sandbox list-ip
    # --code` may serve one, so a scan's error path can be seen in the world.
    errors: dict[str, str] = Field(default_factory=dict)
    txt: str = ""
    part_of: str | None = None  # a component zone answering part of another zone's listing
    part_codes: list[str] = Field(default_factory=list)
    source: Source

    @model_validator(mode="after")
    def _codes(self) -> DnsblZone:
        for code in [
            *self.codes,
            *self.errors,
            *self.part_codes,
            *filter(None, [self.default_code]),
        ]:
            address = ipaddress.ip_address(code)
            if address not in ipaddress.ip_network("127.0.0.0/8"):
                raise ValueError(f"{self.zone}: return code {code} is not in 127.0.0.0/8")
        if self.part_of is None and (self.default_code not in self.codes):
            raise ValueError(f"{self.zone}: default_code must be one of its codes")
        return self


class DnsTimings(Strict):
    ttl: int = Field(ge=0)
    dnsbl_ttl: int = Field(ge=0)
    negative_ttl: int = Field(ge=0)
    note: str = ""


class Behaviour(Strict):
    version: str
    sources: list[Source]
    dns: DnsTimings
    reputation: ReputationModel
    dnsbl: list[DnsblZone]
    providers: list[Provider] = Field(min_length=1)
    placement: Placement

    @model_validator(mode="after")
    def _consistent(self) -> Behaviour:
        zones = {z.zone for z in self.dnsbl}
        for z in self.dnsbl:
            if z.part_of is not None and z.part_of not in zones:
                raise ValueError(f"{z.zone}: part_of names unknown zone {z.part_of}")
        hosts: set[int] = set()
        domains: set[str] = set()
        for p in self.providers:
            for zone in [*p.dnsbl_zones, *filter(None, [p.dbl_zone])]:
                if zone not in zones:
                    raise ValueError(f"provider {p.name}: unknown DNSBL zone {zone}")
            if p.host in hosts:
                raise ValueError(f"provider {p.name}: host offset {p.host} used twice")
            hosts.add(p.host)
            if domains & set(p.domains):
                raise ValueError(f"provider {p.name}: domain served twice")
            domains |= set(p.domains)
        if sum(p.accepts_customer_domains for p in self.providers) != 1:
            raise ValueError("exactly one provider must accept customer domains")
        names = {p.name for p in self.providers} | {"*"}
        for rule in self.placement.rules:
            unknown = set(rule.providers) - names
            if unknown:
                raise ValueError(
                    f"placement rule {rule.name}: unknown provider(s) {sorted(unknown)}"
                )
        return self

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def zone(self, name: str) -> DnsblZone:
        for z in self.dnsbl:
            if z.zone == name:
                return z
        raise KeyError(name)

    @property
    def customer_provider(self) -> Provider:
        return next(p for p in self.providers if p.accepts_customer_domains)

    def provider_for_domain(self, domain: str) -> Provider | None:
        domain = domain.lower()
        return next((p for p in self.providers if domain in p.domains), None)


def load_behaviour(path: Path = BEHAVIOUR_FILE) -> Behaviour:
    try:
        data = yaml.safe_load(path.read_text())
        return Behaviour.model_validate(_with_blocklists(data))
    except (OSError, yaml.YAMLError) as exc:
        raise BehaviourError(f"{path}: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BehaviourError(f"{path}: {where}: {err['msg']}") from None


@cache
def behaviour() -> Behaviour:
    return load_behaviour()


def _with_blocklists(data: dict) -> dict:
    """behaviour.yaml plus the blocklists of runbooks/blocklists.yaml: every zone (and ZEN's
    parts) with its codes, error codes and TXT reason, and per provider the lists it consults.
    behaviour.yaml must not declare them itself: one declaration, read by both sides."""
    from runbooks.loader import blocklists

    if not isinstance(data, dict):
        return data
    if "dnsbl" in data:
        raise BehaviourError("dnsbl: the lists are declared in runbooks/blocklists.yaml")
    zones: list[dict] = []
    consulted: dict[str, list[str]] = {}
    domain_zone: dict[str, str] = {}
    for b in blocklists().spec.lists:
        source = b.sources[0].model_dump()
        zones.append(
            {
                "zone": b.zone,
                "kind": b.kind,
                "default_code": next(iter(b.codes)),
                "codes": dict(b.codes),
                "errors": dict(b.errors),
                "txt": b.txt,
                "source": source,
            }
        )
        for part in b.parts:
            zones.append(
                {
                    "zone": part.zone,
                    "kind": b.kind,
                    "part_of": b.zone,
                    "part_codes": list(part.codes),
                    "source": source,
                }
            )
        for provider in b.consulted_by:
            if b.kind == "ip":
                consulted.setdefault(provider, []).append(b.zone)
            else:
                domain_zone.setdefault(provider, b.zone)
    providers = []
    for p in data.get("providers") or []:
        if isinstance(p, dict):
            for key in ("dnsbl_zones", "dbl_zone"):
                if key in p:
                    raise BehaviourError(
                        f"providers.{p.get('name')}.{key}: runbooks/blocklists.yaml says which "
                        "lists a provider consults (consulted_by)"
                    )
            name = p.get("name")
            p = {**p, "dnsbl_zones": consulted.get(name, []), "dbl_zone": domain_zone.get(name)}
        providers.append(p)
    return {**data, "dnsbl": zones, "providers": providers}
