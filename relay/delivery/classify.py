"""Classifies a remote SMTP reply, or a failure before any reply, with runbooks/classification.yaml.

Every input gets exactly one category, whether it is permanent, and the recommended action,
decided here once and carried as data from then on (DESIGN principle 6). The rules are loaded
and compiled on first use and cached; classifying does no I/O.

Replies come two ways: as the delivery engine's client saw them (parse_reply: RFC 5321 shape),
and as bounces, logs and people quote them (read_reply: any text, wrapped by the reporting MTA,
with or without a reply code).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import get_args

from runbooks.loader import RUNBOOK_DIR, RunbookError, load_file
from runbooks.schema import (
    Action,
    Category,
    ClassificationRunbook,
    FailureKind,
    FailureRule,
    ProvidersRunbook,
    ReplyRule,
)

CATEGORIES: tuple[str, ...] = get_args(Category)
ACTIONS: tuple[str, ...] = get_args(Action)
FAILURE_KINDS: tuple[str, ...] = get_args(FailureKind)
CLASSIFICATION_FILE = RUNBOOK_DIR / "classification.yaml"
PROVIDERS_FILE = RUNBOOK_DIR / "providers.yaml"

# Rule ids for the two outcomes no runbook rule can give.
UNPARSEABLE = "unparseable"
NO_RULE = "no-rule"


class ReplyParseError(ValueError):
    """The text is not an SMTP reply as RFC 5321 section 4.2 shapes it."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int | None  # None only from read_reply, for text that quotes no reply code
    enhanced: str | None  # RFC 3463 class.subject.detail, when the first line carries one
    text: str  # every line's text without its code and enhanced code, joined by spaces

    @classmethod
    def from_response(cls, code: int, message: str) -> Reply:
        """From a client library's (code, message) pair, e.g. aiosmtplib's SMTPResponse."""
        return parse_reply(f"{code} {message}")


@dataclass(frozen=True, slots=True)
class ConnectionFailure:
    """Delivery failed before the remote server said anything: connection, TLS or DNS."""

    kind: FailureKind
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"unknown connection failure kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Classification:
    category: Category
    permanent: bool  # a failure that must not be retried; false for delivered
    action: Action
    rule_id: str
    provider: str | None  # as given, else as recognised by a provider rule
    code: int | None  # for a connection failure, the code it is recorded under
    enhanced_code: str | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------- parsing
# "smtp;" is how a DSN's Diagnostic-Code field (RFC 3464) prefixes the reply it quotes.
_LINE = re.compile(r"\s*(?:smtp;\s*)?([1-5][0-9]{2})([ -]|$)(.*)", re.IGNORECASE)
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")


def parse_reply(raw: str) -> Reply:
    """One reply, single- or multi-line (NNN-text … NNN text).

    Two liberties, both for texts met in practice: a missing final line is tolerated (log
    excerpts cut it), and a line with no code continues the reply, because Python's smtplib
    and aiosmtplib hand a multi-line reply over as its code plus the lines' texts joined by
    newlines. Mixed codes and two replies in one text are refused.
    """
    # Only CR LF / LF end a line (RFC 5321 2.3.8); str.splitlines() would also split on \x1e.
    lines = [line for line in re.split(r"\r?\n", raw) if line.strip()]
    if not lines:
        raise ReplyParseError("not an SMTP reply: empty")
    code: int | None = None
    finished = False
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        m = _LINE.fullmatch(line)
        if m is None and code is None:
            raise ReplyParseError(
                f"not an SMTP reply (it must start with a 3-digit code 1xx-5xx): {line!r}"
            )
        if m is None:
            texts.append(line.strip())
            continue
        line_code = int(m[1])
        if code is not None and line_code != code:
            raise ReplyParseError(
                f"line {number} has code {line_code}, the reply began with {code}"
            )
        if finished:
            raise ReplyParseError(f"line {number} follows the final line ({code} without '-')")
        code, finished = line_code, m[2] != "-"
        texts.append(m[3].strip())
    assert code is not None
    enhanced = None
    first = _ENHANCED.match(texts[0])
    if first:
        enhanced = ".".join(str(int(part)) for part in first.groups())
    kept = []
    for text in texts:
        m = _ENHANCED.match(text)
        if m and enhanced == ".".join(str(int(part)) for part in m.groups()):
            text = text[m.end() :].strip()
        if text:
            kept.append(text)
    return Reply(code, enhanced, " ".join(kept))


# A DSN's "Diagnostic-Code:" field name and diagnostic type (RFC 3464: smtp, X-Postfix, X-Notes).
_DSN_PREFIX = re.compile(r"\s*(?:diagnostic-code\s*:\s*)?(?:[a-z][\w-]{0,30}\s*;\s*)?", re.I)
# A failure's reply code inside other text: not part of a number or a word ("[203.0.113.2]",
# "mta550"), followed by "-", a space, "550:" or the end. A wrapper quotes the failure, so 2xx
# and 3xx there are other numbers ("SIZE=222:").
_EMBEDDED_CODE = re.compile(r"(?<![\w.])([45][0-9]{2})(?:-|:?\s+|:|$)")
# What introduces the quoted reply in MTAs' wrappers: "said: 550", "RCPT TO:550", "<<< 550",
# "returned '550", "#550", "(550" ... Elsewhere a number is a reply code only when an enhanced
# code follows it ("limit of 450 attachments" is not a reply).
_INTRODUCERS = frozenset(":;'\"(<[>#")
# An enhanced code that does not start the reply text: qmail's "(#5.1.1)", or one quoted after
# an introducer ("error '5.7.1 <x>... Access denied'"); not part of a longer dotted number.
_ENHANCED_ANYWHERE = re.compile(
    r"(?:^|[#:;'\"(<\[]\s*)([245])\.([0-9]{1,3})\.([0-9]{1,3})(?![\w.])"
)


def read_reply(raw: str) -> Reply:
    """The reply in any text that quotes one, read leniently; never raises.

    First as parse_reply reads it; then without a DSN's "Diagnostic-Code: smtp;" (or any other
    diagnostic type); then the first reply code an MTA's wrapper introduces ("SMTP error from
    remote mail server after RCPT TO:<x>: host mx [ip]: 550 ...", "said: 550 ...", "501: 5.1.8
    ..."), keeping the wrapper's words in the text, since they can say which command failed.
    Text with no reply code keeps an enhanced code it carries ("5.1.1 <x>... User Unknown") and
    comes back with code None; the text is never lost.
    """
    for candidate in (raw, _flattened(raw)):
        try:
            reply = parse_reply(candidate)
        except ReplyParseError:
            continue
        if reply.code is not None and reply.code >= 400:
            return reply
        # A transcript: "354 End data with <CR><LF>.<CR><LF> 451 4.3.0 Error: queue file
        # write error" - the failure that follows the intermediate reply is the answer.
        return _embedded_failure(reply.text) or reply
    text = _flattened(raw)
    embedded = _embedded_failure(text)
    if embedded is not None:
        return embedded
    lead = _ENHANCED.match(text)
    if lead:
        return Reply(None, _dotted(lead.groups()), text[lead.end() :].strip())
    return Reply(None, _enhanced_anywhere(text), text)


def _flattened(raw: str) -> str:
    """One line, without a DSN's "Diagnostic-Code: smtp;" (or other diagnostic type)."""
    text = " ".join(line.strip() for line in re.split(r"\r?\n", raw) if line.strip())
    return text[_DSN_PREFIX.match(text).end() :]


def _embedded_failure(text: str) -> Reply | None:
    """The first failure reply an MTA's wrapper introduces in the text, else None."""
    for m in _EMBEDDED_CODE.finditer(text):
        before, rest = text[: m.start()].rstrip(), text[m.end() :]
        enhanced_at_start = _ENHANCED.match(rest)
        if before and before[-1] not in _INTRODUCERS and not enhanced_at_start:
            continue
        code = m[1]
        if enhanced_at_start:
            written = enhanced_at_start[0]
            enhanced = _dotted(enhanced_at_start.groups())
            # a multi-line reply flattened by the reporter repeats "550-5.1.1" on every line
            rest = re.sub(rf"(?<![\w.]){code}[ -]{re.escape(written)}(?![\w.])", " ", rest)
            rest = rest.strip()[len(written) :]
        else:
            enhanced = _enhanced_anywhere(rest)
        return Reply(int(code), enhanced, " ".join(f"{before} {rest}".split()))
    return None


def _dotted(parts: Iterable[str]) -> str:
    return ".".join(str(int(part)) for part in parts)


def _enhanced_anywhere(text: str) -> str | None:
    m = _ENHANCED_ANYWHERE.search(text)
    return _dotted(m.groups()) if m else None


# What names a host or a mailbox rather than saying anything about the failure: the host an MTA's
# wrapper names before the reply it quotes ("host mx.antispam.example[192.0.2.1] said:", Exim's
# "host barracuda.example.edu [192.0.2.1]:", Sendmail's "while talking to mx.example.net.:"), and
# any e-mail address ("<spamtrap@example.com>", "abuse@..."). Their words ("spam", "barracuda",
# "block", "policy") would otherwise decide the category; the rules read the text without them.
_NAMED_HOST = re.compile(
    r"(?<![\w.-])[a-z0-9][\w-]*(?:\.[\w-]+)+\.?\s?(?=\[(?:ipv6:)?[0-9a-f.:]+\])"
    r"|(?<=\btalking to )[a-z0-9][\w-]*(?:\.[\w-]+)+\.?(?=:)",
    re.IGNORECASE,
)
_ADDRESS = re.compile(r"(?<![\w.+=-])[\w+=-]+(?:\.[\w+=-]+)*@[\w-]+(?:\.[\w-]+)*")


def matching_text(text: str) -> str:
    """The text the rules read: host names before an IP literal and e-mail addresses neutral."""
    return _ADDRESS.sub("x@x.x", _NAMED_HOST.sub("", text))


def split_replies(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """Group input lines into replies: continuation lines (NNN-) join the lines after them
    up to the final one with the same code. Yields (first line number, reply text)."""
    block: list[str] = []
    start = 0
    block_code = -1
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        m = _LINE.fullmatch(line)
        if block and (m is None or int(m[1]) != block_code):
            yield start, "\n".join(block)  # a continuation with no final line
            block = []
        if not line.strip():
            continue
        if not block:
            start = number
        block.append(line)
        block_code = int(m[1]) if m else -1
        if m is None or m[2] != "-":
            yield start, "\n".join(block)
            block = []
    if block:
        yield start, "\n".join(block)


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: ReplyRule
    code: re.Pattern[str] | None
    klass: int | None  # the code pattern's class digit; None for "x" or no code
    # (class, subject, lowest detail, highest detail); None is a wildcard
    enhanced: tuple[int | None, int | None, int, int] | None
    text: re.Pattern[str] | None
    unless: re.Pattern[str] | None
    unless_enhanced: tuple[int | None, int | None, int, int] | None

    @property
    def code_only(self) -> bool:
        return self.enhanced is None and self.text is None

    def matches(self, reply: Reply, enhanced: tuple[int, ...] | None, klass: int | None) -> bool:
        """klass: the reply code's first digit, else the enhanced code's; None when the text
        carries neither, and then a condition on the code cannot rule the rule out."""
        if self.code is not None and reply.code is not None:
            if not self.code.fullmatch(str(reply.code)):
                return False
        elif self.klass is not None and klass is not None and self.klass != klass:
            return False
        if self.enhanced is not None and (
            enhanced is None or not _enhanced_in(enhanced, self.enhanced)
        ):
            return False
        if (
            self.unless_enhanced is not None
            and enhanced is not None
            and _enhanced_in(enhanced, self.unless_enhanced)
        ):
            return False
        if self.unless is not None and self.unless.search(reply.text):
            return False
        return self.text is None or self.text.search(reply.text) is not None


def _enhanced_in(
    enhanced: tuple[int, ...], pattern: tuple[int | None, int | None, int, int]
) -> bool:
    klass, subject, low, high = pattern
    if klass is not None and klass != enhanced[0]:
        return False
    if subject is not None and subject != enhanced[1]:
        return False
    return low <= enhanced[2] <= high


def _compile_enhanced(written: str | None) -> tuple[int | None, int | None, int, int] | None:
    """'x.7.20-24' -> (None, 7, 20, 24); None is a wildcard."""
    if not written:
        return None
    klass, subject, detail = written.split(".")
    low, _, high = detail.partition("-")
    return (
        None if klass == "x" else int(klass),
        None if subject == "x" else int(subject),
        0 if low == "x" else int(low),
        999 if low == "x" else int(high or low),
    )


def _compile_rule(rule: ReplyRule) -> _CompiledRule:
    match = rule.match
    code = re.compile(match.code.replace("x", "[0-9]")) if match.code else None
    text = re.compile(match.text, re.IGNORECASE) if match.text else None
    unless = re.compile(match.unless, re.IGNORECASE) if match.unless else None
    klass = int(match.code[0]) if match.code and match.code[0] != "x" else None
    return _CompiledRule(
        rule,
        code,
        klass,
        _compile_enhanced(match.enhanced),
        text,
        unless,
        _compile_enhanced(match.unless_enhanced),
    )


@dataclass(frozen=True, slots=True)
class RuleSet:
    # Rules to try, in order, keyed by provider; the key None (provider unknown) tries every
    # provider's rules, since their texts are distinctive enough to name the provider.
    by_provider: dict[str | None, tuple[_CompiledRule, ...]]
    generic: tuple[_CompiledRule, ...]
    code_class: tuple[_CompiledRule, ...]
    failures: dict[str, FailureRule]
    mx_suffixes: tuple[tuple[str, str], ...]  # (suffix, provider), longest suffix first
    fallback_provider: str
    rule_count: int

    def candidates(self, provider: str | None) -> tuple[_CompiledRule, ...]:
        return self.by_provider.get(provider, self.generic)


def _load(file: Path, kind: type):
    runbook = load_file(file)
    if not isinstance(runbook, kind):
        raise RunbookError(file, "kind", f"expected a {kind.__name__}, found {runbook.kind!r}")
    return runbook


def load_rules(
    classification_file: Path = CLASSIFICATION_FILE, providers_file: Path = PROVIDERS_FILE
) -> RuleSet:
    """Load, cross-check and compile both runbooks; raises RunbookError naming the file."""
    spec = _load(classification_file, ClassificationRunbook).spec
    providers = _load(providers_file, ProvidersRunbook).spec
    known = {p.name for p in providers.providers} - {providers.fallback}
    for index, rule in enumerate(spec.provider_rules):
        if rule.provider not in known:
            raise RunbookError(
                classification_file,
                f"spec.provider_rules.{index}.provider",
                f"{rule.provider!r} is not a provider in {providers_file.name}",
            )
    provider_rules = [_compile_rule(r) for r in spec.provider_rules]
    generic = tuple(
        _compile_rule(r)
        for r in spec.text_rules + spec.enhanced_code_rules + spec.fallback_text_rules
    )
    code_class = tuple(_compile_rule(r) for r in spec.code_class_rules)
    fallthrough = generic + code_class
    by_provider: dict[str | None, tuple[_CompiledRule, ...]] = {
        name: tuple(c for c in provider_rules if c.rule.provider == name) + fallthrough
        for name in known
    }
    by_provider[None] = tuple(provider_rules) + fallthrough
    suffixes = sorted(
        ((s, p.name) for p in providers.providers for s in p.mx_suffixes),
        key=lambda pair: -len(pair[0]),
    )
    return RuleSet(
        by_provider=by_provider,
        generic=fallthrough,
        code_class=code_class,
        failures={r.failure: r for r in spec.connection_failure_rules},
        mx_suffixes=tuple(suffixes),
        fallback_provider=providers.fallback,
        rule_count=len(spec.all_rules()),
    )


@cache
def rules() -> RuleSet:
    """The shipped rules, loaded once per process."""
    return load_rules()


# --------------------------------------------------------------------------- public API
def provider_for_mx(mx_host: str) -> str:
    """The provider answering at MX host (suffix match on label boundaries), else the fallback."""
    host = mx_host.strip().rstrip(".").lower()
    for suffix, provider in rules().mx_suffixes:
        if host == suffix or host.endswith("." + suffix):
            return provider
    return rules().fallback_provider


def classify(
    subject: Reply | ConnectionFailure | str, provider: str | None = None
) -> Classification:
    """Exactly one classification for a reply (parsed or raw text) or a connection failure.

    provider: the name provider_for_mx gave, or None when unknown. Raw text is read with
    read_reply; when it quotes no reply code it is classified unknown and transient, rule
    UNPARSEABLE, rather than raising: the caller still has to decide something, retrying within
    the queue lifetime is the safe choice, and a caller that knows more (a DSN's Status field)
    can supply the code. To classify such text by its words, pass read_reply(text) instead.

    A Reply without a code is classified by its text and enhanced code: its class comes from
    the enhanced code when it has one (and with it the permanence), else rules that name a code
    class are not ruled out by it and the reply counts as transient.
    """
    ruleset = rules()
    if isinstance(subject, ConnectionFailure):
        f = ruleset.failures[subject.kind]
        return Classification(
            f.category, f.permanent, f.action, f.id, provider, f.reply_code, f.enhanced_code
        )
    if isinstance(subject, str):
        subject = read_reply(subject)
        if subject.code is None:
            return Classification(
                "unknown", False, "investigate", UNPARSEABLE, provider, None, subject.enhanced
            )
    # qmail and vpopmail put the enhanced code last ("553 ... deactivated (#5.1.1)"); a reply
    # that does not start with one is read with the one it quotes after an introducer.
    written = subject.enhanced or _enhanced_anywhere(subject.text)
    enhanced = tuple(int(part) for part in written.split(".")) if written else None
    subject = Reply(subject.code, written, matching_text(subject.text))
    klass = subject.code // 100 if subject.code is not None else enhanced and enhanced[0]
    # A positive or intermediate reply is never a failure, whatever its text says.
    candidates = ruleset.code_class if klass and klass < 4 else ruleset.candidates(provider)
    for compiled in candidates:
        if klass is None and compiled.code_only:
            continue  # no class to fall back on
        if compiled.matches(subject, enhanced, klass):
            rule = compiled.rule
            permanent = klass == 5 if rule.permanent is None else rule.permanent
            named = provider or (None if rule.provider == "any" else rule.provider)
            return Classification(
                rule.category,
                permanent,
                rule.action,
                rule.id,
                named,
                subject.code,
                subject.enhanced,
            )
    return Classification(
        "unknown",
        klass == 5,
        "investigate",
        NO_RULE,
        provider,
        subject.code,
        subject.enhanced,
    )
