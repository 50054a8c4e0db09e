"""Typed shapes of the Protocol's data files; unknown fields are refused everywhere."""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator


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
        description=(
            "strftime pattern plus {algorithm} and {counter}, e.g. 'ax{algorithm}%Y%m%d{counter}':"
            " a date and a counter, so two rotations on one day still get new selectors"
        ),
    )

    @field_validator("selector_format")
    @classmethod
    def _names_one_key(cls, value: str) -> str:
        missing = [part for part in ("{algorithm}", "{counter}", "%d") if part not in value]
        if missing:
            raise ValueError(f"selector_format {value!r} lacks {', '.join(missing)}")
        return value


class RunbookBase(Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9-]{1,62}$")
    version: str = Field(pattern=r"^\d+(\.\d+){0,2}$")
    title: str
    description: str = ""
    sources: list[Source] = Field(default_factory=list)


class DkimSigningRunbook(RunbookBase):
    kind: Literal["dkim-signing"]
    spec: DkimSigningSpec


# --- reply classification (read by relay/classify.py) ---------------------------------

# Exactly these; the delivery engine, metrics and reactions key on them.
Category = Literal[
    "delivered",
    "mailbox_unknown",
    "mailbox_full",
    "mailbox_disabled",
    "bad_domain",
    "rate_limited",
    "reputation",
    "blocklisted",
    "authentication",
    "rdns",
    "content",
    "policy",
    "message_too_large",
    "tls",
    "transient",
    "unknown",
]
# What the relay is advised to do; suspend/throttle act on the (IP, provider) path and are
# time-bounded (DESIGN principle 3); the check_* ones ask a person to look.
Action = Literal[
    "none",
    "retry",
    "suppress_recipient",
    "suspend_path",
    "throttle_path",
    "check_authentication",
    "check_rdns",
    "check_content",
    "split_message",
    "check_tls",
    "investigate",
]
# Failures observed before any reply: the connection or the DNS lookups behind it.
FailureKind = Literal[
    "connection_refused",
    "connection_timeout",
    "connection_lost",
    "tls_handshake",
    "dns_nxdomain",
    "dns_null_mx",
    "dns_no_mail_host",
    "dns_servfail",
    "dns_timeout",
]


class ReplyMatch(Strict):
    """All given conditions must hold. `x` is a wildcard digit; a detail may be a range."""

    code: str | None = Field(default=None, pattern=r"^[1-5x][0-9x][0-9x]$")
    enhanced: str | None = Field(
        default=None, pattern=r"^[245x]\.(\d{1,3}|x)\.(\d{1,3}(-\d{1,3})?|x)$"
    )
    text: str | None = Field(default=None, description="regex, searched case-insensitively")
    unless: str | None = Field(
        default=None, description="regex; the rule does not apply when the text matches it"
    )
    unless_enhanced: str | None = Field(
        default=None,
        pattern=r"^[245x]\.(\d{1,3}|x)\.(\d{1,3}(-\d{1,3})?|x)$",
        description="an enhanced code as `enhanced` writes it; the rule does not apply to a "
        "reply carrying it",
    )

    @field_validator("text", "unless")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("enhanced", "unless_enhanced")
    @classmethod
    def _range_ascends(cls, value: str | None) -> str | None:
        detail = (value or "").rpartition(".")[2]
        if "-" in detail:
            low, high = (int(n) for n in detail.split("-"))
            if low >= high:
                raise ValueError(f"{value}: a detail range runs from low to high")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> ReplyMatch:
        if self.code is None and self.enhanced is None and self.text is None:
            raise ValueError("a match needs at least one of code, enhanced, text")
        return self


class ReplyRule(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,62}$")
    provider: str = Field(default="any", pattern=r"^[a-z][a-z0-9-]*$")
    match: ReplyMatch
    category: Category
    # None: as the reply code says (5xx permanent). Set it only to overrule the code.
    permanent: bool | None = None
    action: Action
    source: Source
    note: str = ""


class FailureRule(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,62}$")
    failure: FailureKind
    category: Category
    permanent: bool
    action: Action
    # How the failure is recorded in delivery events and DSNs (RFC 3463 codes for local failures).
    reply_code: int = Field(ge=400, le=599)
    enhanced_code: str = Field(pattern=r"^[45]\.\d{1,3}\.\d{1,3}$")
    source: Source
    note: str = ""

    @model_validator(mode="after")
    def _code_agrees(self) -> FailureRule:
        if (
            self.permanent != (self.reply_code >= 500)
            or self.enhanced_code[0] != str(self.reply_code)[0]
        ):
            raise ValueError("permanent, reply_code and enhanced_code must agree on the class")
        return self


class ClassificationSpec(Strict):
    """Tiers tried in this order; the first matching rule decides."""

    provider_rules: list[ReplyRule]
    text_rules: list[ReplyRule]
    enhanced_code_rules: list[ReplyRule]
    # Generic words ("policy", "access denied", "system error") that say less than a specific
    # enhanced code: tried after the enhanced code rules, before the reply code's class.
    fallback_text_rules: list[ReplyRule] = Field(default_factory=list)
    code_class_rules: list[ReplyRule]
    connection_failure_rules: list[FailureRule]

    @model_validator(mode="after")
    def _tiers_are_consistent(self) -> ClassificationSpec:
        ids = [r.id for r in self.all_rules()]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate rule ids: {', '.join(dupes)}")
        for r in self.provider_rules:
            if r.provider == "any" or r.match.text is None:
                raise ValueError(f"provider rule {r.id}: needs a provider and a text pattern")
        generic = self.text_rules + self.enhanced_code_rules + self.fallback_text_rules
        for r in generic + self.code_class_rules:
            if r.provider != "any":
                raise ValueError(f"rule {r.id}: only provider_rules may name a provider")
        for r in self.text_rules + self.fallback_text_rules:
            if r.match.text is None:
                raise ValueError(f"text rule {r.id}: needs a text pattern")
        for r in self.enhanced_code_rules:
            if r.match.enhanced is None or r.match.text is not None:
                raise ValueError(f"enhanced code rule {r.id}: matches on enhanced (and code) only")
        for r in self.code_class_rules:
            if r.match.code is None or r.match.enhanced or r.match.text:
                raise ValueError(f"code class rule {r.id}: matches on code only")
        kinds = [r.failure for r in self.connection_failure_rules]
        missing = sorted(set(get_args(FailureKind)) - set(kinds))
        if missing or len(kinds) != len(set(kinds)):
            raise ValueError(f"connection failure rules: need each kind once (missing {missing})")
        return self

    def all_rules(self) -> list[ReplyRule | FailureRule]:
        return [
            *self.provider_rules,
            *self.text_rules,
            *self.enhanced_code_rules,
            *self.fallback_text_rules,
            *self.code_class_rules,
            *self.connection_failure_rules,
        ]


class ClassificationRunbook(RunbookBase):
    kind: Literal["classification"]
    spec: ClassificationSpec


class Provider(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    title: str
    # Host-name suffixes on label boundaries: "google.com" matches "aspmx.l.google.com".
    mx_suffixes: list[str] = Field(default_factory=list)
    sources: list[Source] = Field(min_length=1)

    @field_validator("mx_suffixes")
    @classmethod
    def _hostnames(cls, value: list[str]) -> list[str]:
        for suffix in value:
            if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", suffix):
                raise ValueError(f"{suffix!r}: write a lower-case host suffix, no leading dot")
        return value


class ProvidersSpec(Strict):
    # The name given to every MX no entry claims; its entry lists no suffixes.
    fallback: str
    providers: list[Provider] = Field(min_length=1)

    @model_validator(mode="after")
    def _unambiguous(self) -> ProvidersSpec:
        names = [p.name for p in self.providers]
        if len(names) != len(set(names)):
            raise ValueError("provider names must be unique")
        suffixes = [s for p in self.providers for s in p.mx_suffixes]
        if len(suffixes) != len(set(suffixes)):
            raise ValueError("an MX suffix may belong to one provider only")
        if self.fallback not in names:
            raise ValueError(f"fallback {self.fallback!r} is not a listed provider")
        for p in self.providers:
            if (p.name == self.fallback) == bool(p.mx_suffixes):
                raise ValueError(
                    f"provider {p.name}: the fallback lists no MX suffixes, every other one does"
                )
        return self


class ProvidersRunbook(RunbookBase):
    kind: Literal["providers"]
    spec: ProvidersSpec


Runbook = Annotated[
    DkimSigningRunbook | ClassificationRunbook | ProvidersRunbook, Field(discriminator="kind")
]
