"""Asking the DNS blocklists about our sending IPs and domains, and keeping what they said.

The lists are Protocol data (runbooks/blocklists.yaml): zone, kind, the meaning of each code.
This module is the scanning core the blocklist-scan runbook and `axiom blocklist check` share:

    targets(session)        every sending IP (not retired) and every active sending domain
                            with its return-path domain
    scan(targets, ns, …)    every target against every list of its kind, concurrently through
                            one resolver: one Answer per (target, list)
    check(target, …)        one target (the CLI)
    apply(session, …)       the answers into BlocklistListing; new listings and clearances are
                            audited and returned as events, errors returned for an incident

What an answer is (RFC 5782 2.1, and the lists' own documentation):

    listed  A records, every one a listing code the list documents; the TXT record at the same
            name is the list's reason
    clear   NXDOMAIN, or the name exists with no A record
    error   an error code (Spamhaus's 127.255.255.252/254/255: the resolver is refused or over
            its quota; DBL's 127.0.1.255: an IP asked of a domain list), a code the list does
            not document, SERVFAIL, REFUSED, a timeout. One such code among listing codes makes
            the whole answer an error: a resolver that returns garbage is not trusted halfway.

An error is never a listing and never a clearance: the previous state stands, the row records
last_error, and the scan returns it so the runbook raises a configuration incident. This is the
one rule the whole runbook leans on: Spamhaus answers 127.255.255.254 to every query that comes
through a public resolver, and reading that as a listing would suspend every IP at once, while
reading it as "not listed" would clear every real listing.

Query names: IPv4 octets reversed, IPv6 nibbles reversed (dns.reversename without its
in-addr/ip6 suffix), a domain as is, then the list's zone; with a Spamhaus Data Query Service
key, the list's DQS zone (<key>.zen.dq.spamhaus.net) instead, since the public mirrors refuse
queries from the big public resolvers and cloud providers.

The resolver is configured as protocol/dns_checks.py's: AXIOM_DNS_NAMESERVERS (empty: the
system's), no cache (a scan must see a delisting at once), tries of at most 1 s within a
per-query lifetime; queries run as asyncio tasks under a concurrency bound, so 256 IPs × 6 IP
lists take about as long as the slowest few answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename
from sqlmodel import Session, col, select

from models import BlocklistListing, Domain, DomainState, IpAddress, IpState
from models.audit import as_utc
from models.audit_trail import record
from protocol.domains import return_path_of
from protocol.errors import ServiceError
from runbooks.schema_blocklists import Blocklist

if TYPE_CHECKING:
    from config.settings import Settings

Kind = Literal["ip", "domain"]
Status = Literal["listed", "clear", "error"]
Runbook = tuple[str, str]  # (id, version) for the audit entries

DEFAULT_TIMEOUT = 3.0  # seconds per query, retries within it
DEFAULT_CONCURRENCY = 64  # queries in flight at once

# RFC 5782 5: every list carries these test entries; asked when there is nothing to scan, so
# that a refused or silent resolver is still found out (an error), at the cost of one query.
PROBE_IP = "127.0.0.2"

# A host name (RFC 1123 labels; a single label is allowed: RFC 5782's `test` and `invalid`),
# whose last label is not all digits (RFC 3696 2), so that "1.2.3" is not taken for a domain.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$)(?:{_LABEL}\.)*(?![0-9]+$){_LABEL}$")


# ---------------------------------------------------------------- targets and names
@dataclass(frozen=True, order=True)
class Target:
    kind: Kind
    name: str  # an IP in its compressed form, or a lower-case domain without the final dot


def parse_target(value: str) -> Target:
    """An IP address or a domain name as an operator types it; ServiceError names the value."""
    text = value.strip()
    try:
        return Target("ip", str(ipaddress.ip_address(text.strip("[]"))))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    if not _HOST.match(name):
        raise ServiceError(f"{value!r} is neither an IP address nor a domain name")
    return Target("domain", name)


def query_name(target: Target, zone: str) -> str:
    """The name to ask ZONE about TARGET: 2.0.0.127.zen.spamhaus.org, example.com.dbl…"""
    if target.kind == "ip":
        reversed_ = dns.reversename.from_address(target.name)
        # 4.3.2.1.in-addr.arpa. or the 32 nibbles .ip6.arpa.: the labels before the suffix.
        labels = reversed_.relativize(
            dns.reversename.ipv4_reverse_domain
            if ipaddress.ip_address(target.name).version == 4
            else dns.reversename.ipv6_reverse_domain
        )
        prefix = labels.to_text()
    else:
        prefix = target.name
    return f"{prefix}.{zone.strip().rstrip('.').lower()}"


def targets(session: Session) -> list[Target]:
    """What the relay sends from and as: every IP not retired (a cold or listed IP too: it will
    send again, and a listing found before then is cheaper), every active sending domain and
    its return-path domain (the one named, else bounces.<domain>: what MAIL FROM carries once
    published). Sorted, without repeats."""
    found: set[Target] = set()
    for address in session.exec(
        select(IpAddress.address).where(IpAddress.state != IpState.retired)
    ).all():
        found.add(Target("ip", str(ipaddress.ip_address(address))))
    for domain in session.exec(select(Domain).where(Domain.state == DomainState.active)).all():
        found.add(Target("domain", domain.name.lower().rstrip(".")))
        found.add(Target("domain", return_path_of(domain).lower().rstrip(".")))
    return sorted(found)


# ---------------------------------------------------------------- answers
@dataclass(frozen=True)
class Answer:
    """What one list said about one target."""

    target: str
    kind: Kind
    list_id: str
    list_name: str
    query: str
    status: Status
    codes: tuple[str, ...] = ()  # the A records, as returned
    meanings: tuple[str, ...] = ()  # one per code, from the list's documentation
    reason: str = ""  # TXT, when listed
    error: str = ""  # why this is not a verdict
    probe: bool = False  # RFC 5782's test entry, asked when there was nothing to scan

    @property
    def meaning(self) -> str:
        return "; ".join(self.meanings)

    def as_json(self) -> dict:
        return {
            "target": self.target,
            "kind": self.kind,
            "list": self.list_id,
            "list_name": self.list_name,
            "query": self.query,
            "status": self.status,
            "codes": list(self.codes),
            "meanings": list(self.meanings),
            "reason": self.reason,
            "error": self.error,
            "probe": self.probe,
        }


def interpret(
    blocklist: Blocklist, target: Target, query: str, codes: Sequence[str], reason: str = ""
) -> Answer:
    """A records → listed (each code's meaning) or error (an error code, or one the list does
    not document, among them); none → clear."""
    base = {
        "target": target.name,
        "kind": target.kind,
        "list_id": blocklist.id,
        "list_name": blocklist.name,
        "query": query,
    }
    if not codes:
        return Answer(**base, status="clear")
    ordered = tuple(sorted(set(codes), key=ipaddress.ip_address))
    verdicts = [blocklist.meaning(code) for code in ordered]
    meanings = tuple(text for _, text in verdicts)
    bad = [
        f"{code}: {text}"
        for code, (kind, text) in zip(ordered, verdicts, strict=True)
        if kind == "error"
    ]
    if bad:
        return Answer(
            **base, status="error", codes=ordered, meanings=meanings, error="; ".join(bad)
        )
    return Answer(**base, status="listed", codes=ordered, meanings=meanings, reason=reason)


def failed(blocklist: Blocklist, target: Target, query: str, error: str) -> Answer:
    return Answer(
        target=target.name,
        kind=target.kind,
        list_id=blocklist.id,
        list_name=blocklist.name,
        query=query,
        status="error",
        error=error,
    )


# ---------------------------------------------------------------- DNS
class _Resolver:
    """Asynchronous questions through one dnspython resolver with no cache."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float):
        if nameservers:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        else:
            self.resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        # As protocol/dns_checks.py: tries of at most 1 s, so a lost datagram is retried.
        self.resolver.timeout = min(1.0, timeout)
        self.resolver.lifetime = timeout
        self.resolver.retry_servfail = False
        self.resolver.cache = None
        self.timeout = timeout

    async def ask(self, name: str, rdtype: str) -> tuple[tuple[str, ...] | None, str]:
        """(values, "") — an empty tuple for NXDOMAIN or no data — or (None, why it failed)."""
        try:
            answer = await self.resolver.resolve(
                dns.name.from_text(name), rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return (), ""
        except dns.resolver.NoNameservers as exc:
            return None, _servers_failed(exc)
        except dns.exception.Timeout:
            return None, f"no answer within {self.timeout:g} s (timeout)"
        except (dns.exception.DNSException, OSError) as exc:
            return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if answer.rrset is None:
            return (), ""
        if rdtype == "TXT":
            return tuple(
                b"".join(rd.strings).decode("utf-8", errors="replace") for rd in answer.rrset
            ), ""
        return tuple(rd.to_text() for rd in answer.rrset), ""


def _servers_failed(exc: dns.resolver.NoNameservers) -> str:
    """ "127.0.0.1:53 answered SERVFAIL", per server: the rcode is what an operator needs."""
    errors = exc.kwargs.get("errors") or []
    parts = [f"{server}:{port} answered {error}" for server, _tcp, port, error, *_ in errors]
    return "; ".join(parts) or "no nameserver answered"


async def _ask_one(
    resolver: _Resolver, semaphore: asyncio.Semaphore, blocklist: Blocklist, target: Target, zone
) -> Answer:
    name = query_name(target, zone)
    async with semaphore:
        codes, error = await resolver.ask(name, "A")
    if codes is None:
        return failed(blocklist, target, name, error)
    answer = interpret(blocklist, target, name, codes)
    if answer.status != "listed":
        return answer
    async with semaphore:
        texts, _ = await resolver.ask(name, "TXT")
    # The reason is evidence, not the verdict: a lost TXT answer leaves it empty.
    return interpret(blocklist, target, name, codes, " | ".join(texts or ()))


async def scan_async(
    wanted: Iterable[Target],
    lists: Sequence[Blocklist],
    nameservers: Sequence[tuple[str, int]],
    *,
    dqs_key: str | None = None,
    query_timeout: float = DEFAULT_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[Answer]:
    resolver = _Resolver(nameservers, query_timeout)
    semaphore = asyncio.Semaphore(max(1, concurrency))
    jobs = [
        (blocklist, target)
        for target in wanted
        for blocklist in lists
        if blocklist.kind == target.kind
    ]
    if not jobs:  # nothing to scan: one query, so that a refused resolver still shows
        probe = next((b for b in lists if b.kind == "ip"), None)
        if probe is None:
            return []
        answer = await _ask_one(
            resolver, semaphore, probe, Target("ip", PROBE_IP), probe.query_zone(dqs_key)
        )
        return [replace(answer, probe=True)] if answer.status == "error" else []
    return list(
        await asyncio.gather(
            *(_ask_one(resolver, semaphore, b, t, b.query_zone(dqs_key)) for b, t in jobs)
        )
    )


def scan(
    wanted: Iterable[Target],
    nameservers: Sequence[tuple[str, int]],
    *,
    lists: Sequence[Blocklist] | None = None,
    dqs_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[Answer]:
    """Every target against every list of its kind (lists: the runbook's, by default); one
    Answer per pair, in target order. No database: run it outside a transaction. With no
    target, one probe query (RFC 5782's 127.0.0.2 against the first IP list), returned only if
    it is an error."""
    if lists is None:
        from runbooks.loader import blocklists

        lists = blocklists().spec.lists
    run = scan_async(
        list(wanted),
        lists,
        nameservers,
        dqs_key=dqs_key,
        query_timeout=timeout,
        concurrency=concurrency,
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run)
    # Called from inside an event loop (an async flow): run ours in a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run).result()


def nameservers_of(settings: Settings) -> list[tuple[str, int]]:
    from config.settings import parse_nameserver

    return [parse_nameserver(entry) for entry in settings.dns_nameservers]


def check(
    target: str | Target,
    settings_or_nameservers: Settings | Sequence[tuple[str, int]],
    *,
    lists: Sequence[Blocklist] | None = None,
    dqs_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Answer]:
    """TARGET (an IP or a domain; ServiceError when it is neither) against every list of its
    kind, one Answer per list in the runbook's order. Given settings, their nameservers and, once
    the setting exists, their Spamhaus DQS key."""
    wanted = target if isinstance(target, Target) else parse_target(target)
    if isinstance(settings_or_nameservers, Sequence):
        nameservers = list(settings_or_nameservers)
    else:
        nameservers = nameservers_of(settings_or_nameservers)
        dqs_key = dqs_key or getattr(settings_or_nameservers, "spamhaus_dqs_key", None)
    return scan([wanted], nameservers, lists=lists, dqs_key=dqs_key, timeout=timeout)


# ---------------------------------------------------------------- state
@dataclass(frozen=True)
class Event:
    """A listing that appeared or went away; the blocklist-delisting runbook starts on one."""

    kind: Literal["listed", "cleared"]
    target: str
    target_kind: Kind
    list_id: str
    list_name: str
    codes: tuple[str, ...]
    meaning: str
    reason: str
    first_seen: datetime
    at: datetime

    def as_json(self) -> dict:
        return {
            "kind": self.kind,
            "target": self.target,
            "target_kind": self.target_kind,
            "list": self.list_id,
            "list_name": self.list_name,
            "codes": list(self.codes),
            "meaning": self.meaning,
            "reason": self.reason,
            "first_seen": self.first_seen.isoformat(),
            "at": self.at.isoformat(),
        }


@dataclass
class ScanResult:
    events: list[Event] = field(default_factory=list)
    errors: list[Answer] = field(default_factory=list)  # not verdicts: the state stood
    answers: int = 0
    listed: list[Answer] = field(default_factory=list)  # every listing this scan saw

    @property
    def listings(self) -> list[Event]:
        return [e for e in self.events if e.kind == "listed"]

    @property
    def clearances(self) -> list[Event]:
        return [e for e in self.events if e.kind == "cleared"]

    def as_json(self) -> dict:
        return {
            "answers": self.answers,
            "events": [e.as_json() for e in self.events],
            "errors": [a.as_json() for a in self.errors],
            "listed": [a.as_json() for a in self.listed],
        }


def apply(
    session: Session,
    answers: Iterable[Answer],
    *,
    now: datetime,
    actor: str,
    runbook: Runbook | None = None,
) -> ScanResult:
    """Write the answers into BlocklistListing; the caller commits.

    listed: a row not listed before becomes listed (first_seen now): an event, audited
            `blocklist.listed`; one already listed gets last_seen, and its codes, meaning and
            reason as now answered (a change of code is not a new listing).
    clear:  a listed row becomes clear (cleared_at now): an event, audited `blocklist.cleared`;
            otherwise nothing is written (no row: never listed).
    error:  last_error and last_error_at only; the state stands. A target never answered gets
            a row in state `unknown`, so `axiom blocklist status` shows the error.

    A verdict ends the previous error (last_error emptied, last_error_at kept). The same
    answers applied twice write no second audit entry."""
    answers = list(answers)
    result = ScanResult(answers=len(answers))
    rows = _rows(session, answers)
    for answer in answers:
        row = rows.get((answer.target, answer.list_id))
        if answer.status == "error":
            result.errors.append(answer)
            if answer.probe:  # not a target of ours: no state to keep
                continue
            if row is None:
                row = BlocklistListing(
                    target=answer.target,
                    target_kind=answer.kind,
                    list_id=answer.list_id,
                    state="unknown",
                    created_at=now,
                )
                rows[(answer.target, answer.list_id)] = row
            row.last_error = f"{answer.query}: {answer.error}"
            row.last_error_at = now
            session.add(row)
            continue
        if answer.status == "listed":
            result.listed.append(answer)
            if row is None:
                row = BlocklistListing(
                    target=answer.target,
                    target_kind=answer.kind,
                    list_id=answer.list_id,
                    state="unknown",
                    created_at=now,
                )
                rows[(answer.target, answer.list_id)] = row
            new = row.state != "listed"
            row.state = "listed"
            row.codes = list(answer.codes)
            row.meaning = answer.meaning
            row.reason = answer.reason
            row.last_seen = now
            row.last_error = None
            if new:
                row.first_seen = now
                row.cleared_at = None
                result.events.append(_event("listed", row, answer, now, session, actor, runbook))
            session.add(row)
            continue
        # clear
        if row is None:
            continue
        if row.state == "listed":
            row.state = "clear"
            row.cleared_at = now
            row.last_error = None
            result.events.append(_event("cleared", row, answer, now, session, actor, runbook))
            session.add(row)
        elif row.state == "unknown" or row.last_error is not None:
            row.state = "clear"
            row.last_error = None
            session.add(row)
    session.flush()
    return result


def _rows(session: Session, answers: list[Answer]) -> dict[tuple[str, str], BlocklistListing]:
    """The existing rows for these answers, read in chunks (a scan has thousands of answers)."""
    names = sorted({a.target for a in answers})
    rows: dict[tuple[str, str], BlocklistListing] = {}
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        for row in session.exec(
            select(BlocklistListing).where(col(BlocklistListing.target).in_(chunk))
        ).all():
            rows[(row.target, row.list_id)] = row
    return rows


def _event(
    kind: Literal["listed", "cleared"],
    row: BlocklistListing,
    answer: Answer,
    now: datetime,
    session: Session,
    actor: str,
    runbook: Runbook | None,
) -> Event:
    # On a clearance the answer has no codes: the evidence is what the listing was.
    event = Event(
        kind=kind,
        target=row.target,
        target_kind=row.target_kind,  # type: ignore[arg-type]
        list_id=row.list_id,
        list_name=answer.list_name,
        codes=tuple(row.codes),
        meaning=row.meaning,
        reason=row.reason,
        first_seen=as_utc(row.first_seen) if row.first_seen else now,
        at=now,
    )
    record(
        session,
        actor=actor,
        action=f"blocklist.{kind}",
        subject=f"{row.target_kind}:{row.target}",
        evidence={
            "list": row.list_id,
            "list_name": answer.list_name,
            "query": answer.query,
            "codes": list(row.codes),
            "meaning": row.meaning,
            "reason": row.reason,
            "first_seen": event.first_seen.isoformat(),
        },
        runbook_id=runbook[0] if runbook else None,
        runbook_version=runbook[1] if runbook else None,
        at=now,
    )
    return event


def status(session: Session) -> list[BlocklistListing]:
    """The rows worth a look: listed now, or whose last answer was an error; listed first."""
    rows = session.exec(
        select(BlocklistListing)
        .where((BlocklistListing.state == "listed") | col(BlocklistListing.last_error).is_not(None))
        .order_by(BlocklistListing.target, BlocklistListing.list_id)
    ).all()
    return sorted(rows, key=lambda r: r.state != "listed")
