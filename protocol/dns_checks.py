"""What a sending domain has published in DNS, checked against what we asked for (issue 14 §3).

`expected_records` reads what the customer was told to publish (protocol.domains.domain_records)
and the source IPs the domain will send from; `check_domain` asks DNS and returns one `Check`
per row of the table, each with an exact reason; `check_and_record` does both and stores the
result in Domain.dns_checks. The onboarding, rotation and health runbooks and `axiom domain
check` all use these, so they see the same table.

The rows, by stable name (those marked * appear only when what they depend on is there: a
single SPF record that parses, a DMARC record that parses):

    spf.record           exactly one SPF record at the domain, and it parses (RFC 7208 4.5)
    spf.lookups*         at most 10 DNS-querying terms, nested includes counted (RFC 7208 4.6.4)
    spf.void_lookups*    at most 2 lookups that find nothing (RFC 7208 4.6.4)
    spf.include*         include:_spf.<relay> reached, directly or in a nested include, before
                         any `all`
    dkim:<selector>      the key record equals ours (k= and p=; whitespace, tag order and TXT
                         string splitting do not matter)
    dmarc.record         a DMARC record applies to the domain and parses (RFC 7489 / 9989)
    dmarc.policy*        p= is there (none at least)
    dmarc.rua*           (warn) aggregate reports go to the relay's address, so domain-health
                         can read them; a missing one costs reports, not delivery, hence warn
    alignment.dkim       we sign with d=<domain>, the header From domain: aligned as soon as one
                         of our keys is published right
    alignment.return_path  the return-path subdomain's organisational domain is the From
                         domain's (relaxed SPF alignment; the Public Suffix List decides, never
                         "the last two labels"); a DMARC aspf=s makes it a warning, since DMARC
                         then passes through DKIM alone
    return_path.mx       the return-path subdomain's MX names only the relay's inbound host
    return_path.spf      one SPF record there, including ours
    fcrdns:<ip>          the IP's PTR names a host whose A/AAAA holds the IP (owner: relay)

`passed` is every error-level row ok; warn-level rows never hold a domain back. `owner` says
who fixes a row: "customer" (their zone) or "relay" (ours: our IPs' PTRs, our names).

checkdmarc does the SPF and DMARC parsing and the lookup counting. It is synchronous and keeps
a process-wide DNS cache keyed without the nameserver, so each check clears it and holds a
process-wide lock around its use: a re-check sees DNS as it is now, and two checks against
different nameservers never read each other's answers. Our own lookups (DKIM, MX, PTR, A/AAAA,
the include walk) go through the same dnspython resolver, which caches nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename
from sqlmodel import Session, col, select

from models import Domain, IpAddress, IpPool, IpState, Stream
from protocol.domains import DnsRecord, domain_records, get_domain
from relay.delivery.egress import DEFAULT_POOL

if TYPE_CHECKING:
    from config.settings import Settings

Level = Literal["error", "warn"]
Owner = Literal["customer", "relay"]

MAX_DNS_LOOKUPS = 10  # RFC 7208 4.6.4
MAX_VOID_LOOKUPS = 2  # RFC 7208 4.6.4
_WALK_LIMIT = 20  # SPF records read looking for our include (a receiver stops at 10 lookups)

# checkdmarc's DNS cache is one dict per process (checkdmarc.utils.DNS_CACHE).
_CHECKDMARC = threading.Lock()


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class Check:
    """One row of the check table."""

    name: str
    ok: bool
    reason: str
    found: str | None = None
    expected: str | None = None
    level: Level = "error"
    owner: Owner = "customer"
    transient: bool = False  # DNS did not answer (SERVFAIL, timeout): not a verdict

    @property
    def blocking(self) -> bool:
        """Failing, at error level: this row alone keeps the domain from passing."""
        return not self.ok and self.level == "error"

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "ok": self.ok,
            "level": self.level,
            "owner": self.owner,
            "transient": self.transient,
            "reason": self.reason,
            "found": self.found,
            "expected": self.expected,
        }

    @classmethod
    def from_json(cls, data: dict) -> Check:
        return cls(
            name=data["name"],
            ok=bool(data["ok"]),
            reason=data["reason"],
            found=data.get("found"),
            expected=data.get("expected"),
            level=data.get("level", "error"),
            owner=data.get("owner", "customer"),
            transient=bool(data.get("transient", False)),
        )


@dataclass(frozen=True)
class DomainCheck:
    domain: str
    checks: list[Check]
    checked_at: datetime

    @property
    def passed(self) -> bool:
        return not any(c.blocking for c in self.checks)

    @property
    def transient(self) -> bool:
        """Some failing row failed because DNS did not answer: worth asking again soon."""
        return any(c.transient and not c.ok for c in self.checks)

    def missing(self, owner: Owner | None = None) -> list[Check]:
        """The failing rows (warnings included; see Check.level), for notices; owner="customer"
        leaves out what only we can fix (our IPs' PTRs)."""
        return [c for c in self.checks if not c.ok and (owner is None or c.owner == owner)]

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def as_json(self) -> dict:
        return {
            "domain": self.domain,
            "checked_at": self.checked_at.isoformat(),
            "passed": self.passed,
            "checks": [c.as_json() for c in self.checks],
        }

    @classmethod
    def from_json(cls, data: dict) -> DomainCheck:
        return cls(
            domain=data["domain"],
            checks=[Check.from_json(c) for c in data.get("checks", [])],
            checked_at=datetime.fromisoformat(data["checked_at"]),
        )


# ---------------------------------------------------------------- what we expect
@dataclass(frozen=True)
class DkimExpected:
    selector: str
    name: str  # <selector>._domainkey.<domain>
    value: str  # v=DKIM1; k=…; p=…


@dataclass(frozen=True)
class SourceIp:
    address: str
    ptr_name: str | None  # what the pool says its PTR is


@dataclass(frozen=True)
class Expected:
    domain: str
    spf: str  # the record we asked for
    dkim: tuple[DkimExpected, ...]
    dmarc: str
    dmarc_rua: tuple[str, ...]  # mailbox addresses the relay receives reports at
    return_path_domain: str
    return_path_mx: tuple[str, ...]  # the hosts its MX must name
    return_path_spf: str
    ips: tuple[SourceIp, ...] = field(default=())


def expected_records(
    session: Session, domain_name: str, relay_hostname: str, dmarc_address: str | None = None
) -> Expected:
    """What DOMAIN must show in DNS: the records `axiom domain records` gives the customer
    (protocol.domains.domain_records, told apart by their `kind`), and the source IPs it will
    send from."""
    domain = get_domain(session, domain_name)
    records = domain_records(session, domain.name, relay_hostname, dmarc_address)
    by_kind: dict[str, list[DnsRecord]] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    spf = by_kind["spf"][0].value
    dmarc = by_kind["dmarc"][0].value
    rp_mx, rp_spf = by_kind["return_path_mx"], by_kind["return_path_spf"]
    return Expected(
        domain=domain.name,
        spf=spf,
        dkim=tuple(
            DkimExpected(r.name.split("._domainkey.", 1)[0], r.name.lower(), r.value)
            for r in by_kind.get("dkim", [])
        ),
        dmarc=dmarc,
        dmarc_rua=_rua_addresses(dmarc),
        return_path_domain=rp_mx[0].name.lower().rstrip("."),
        return_path_mx=tuple(_mx_host(r.value) for r in rp_mx),
        return_path_spf=rp_spf[0].value,
        ips=tuple(_source_ips(session, domain)),
    )


def _mx_host(value: str) -> str:
    return value.split()[-1].lower().rstrip(".")


def _spf_includes(record: str) -> tuple[str, ...]:
    return tuple(
        term.split(":", 1)[1].lower().rstrip(".")
        for term in record.split()[1:]
        if term.lower().lstrip("+").startswith("include:")
    )


def _rua_addresses(dmarc: str) -> tuple[str, ...]:
    tags = _tags(dmarc)
    return tuple(
        uri.strip()[len("mailto:") :].split("!")[0].lower()
        for uri in tags.get("rua", "").split(",")
        if uri.strip().lower().startswith("mailto:")
    )


def _source_ips(session: Session, domain: Domain) -> list[SourceIp]:
    """The addresses of the pools bound to the tenant's streams (pool and fallback), or of the
    default pool when the tenant has none; retired addresses send nothing and are left out."""
    streams = session.exec(select(Stream).where(Stream.tenant_id == domain.tenant_id)).all()
    pool_ids = {s.pool_id for s in streams} | {
        s.fallback_pool_id for s in streams if s.fallback_pool_id is not None
    }
    if not streams:
        default = session.exec(select(IpPool).where(IpPool.name == DEFAULT_POOL)).first()
        pool_ids = {default.id} if default is not None else set()
    if not pool_ids:
        return []
    rows = session.exec(
        select(IpAddress)
        .where(col(IpAddress.pool_id).in_(pool_ids), IpAddress.state != IpState.retired)
        .order_by(IpAddress.address)
    ).all()
    return [SourceIp(r.address, r.ptr_name) for r in rows]


# ---------------------------------------------------------------- organisational domains
@functools.cache
def _psl():
    from publicsuffixlist import PublicSuffixList

    # The list as the package ships it (offline), private section included, as RFC 7489 3.2
    # asks; a name under an unknown TLD (.test) counts as under a public suffix.
    return PublicSuffixList()


def organisational_domain(name: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label, from the Public Suffix List; a name that
    is itself a public suffix is its own."""
    text = name.lower().rstrip(".")
    return _psl().privatesuffix(text) or text


# ---------------------------------------------------------------- DNS
@dataclass(frozen=True)
class _Answer:
    status: Literal["answer", "nxdomain", "nodata", "error"]
    values: tuple[str, ...] = ()
    detail: str = ""

    @property
    def transient(self) -> bool:
        return self.status == "error"

    def describe(self, rdtype: str, name: str) -> str:
        if self.status == "nxdomain":
            return f"{name} does not exist (NXDOMAIN)"
        if self.status == "nodata":
            return f"{name} has no {rdtype} record"
        if self.status == "error":
            return f"the {rdtype} lookup of {name} failed ({self.detail}); try again later"
        return f"{rdtype} {name}: " + ", ".join(self.values)


class _Dns:
    """Synchronous questions through one dnspython resolver with no cache."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float):
        if nameservers:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
            self.resolver.nameservers = list(self.nameservers)
        else:
            self.resolver = dns.resolver.Resolver()  # /etc/resolv.conf
            self.nameservers = list(self.resolver.nameservers)
        # As checkdmarc does for its own resolvers: tries of at most 1 s within the lifetime, so
        # a lost UDP datagram is retried rather than spending the whole budget.
        self.resolver.timeout = min(1.0, timeout)
        self.resolver.lifetime = timeout
        self.resolver.retry_servfail = False
        self.resolver.cache = None
        self.timeout = timeout

    def ask(self, name: str, rdtype: str) -> _Answer:
        try:
            answer = self.resolver.resolve(
                dns.name.from_text(name), rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return _Answer("nxdomain")
        except dns.resolver.NoNameservers as exc:
            return _Answer("error", detail=_first_line(exc))
        except dns.exception.Timeout:
            return _Answer("error", detail=f"no answer within {self.timeout:g} s")
        except (dns.exception.DNSException, OSError) as exc:
            return _Answer("error", detail=f"{type(exc).__name__}: {_first_line(exc)}")
        if answer.rrset is None:
            return _Answer("nodata")
        return _Answer("answer", tuple(_text(rd) for rd in answer.rrset))

    def addresses(self, name: str) -> _Answer:
        a, aaaa = self.ask(name, "A"), self.ask(name, "AAAA")
        values = a.values + aaaa.values
        if values:
            return _Answer("answer", values)
        for part in (a, aaaa):
            if part.transient:
                return part
        return _Answer("nxdomain" if "nxdomain" in (a.status, aaaa.status) else "nodata")


def _text(rdata) -> str:
    if rdata.rdtype == dns.rdatatype.TXT:
        # One record's strings are joined with nothing between them (RFC 7208 3.3, RFC 6376
        # 3.6.2.2): a 2048-bit DKIM key is split across several.
        return b"".join(rdata.strings).decode("utf-8", errors="replace")
    if rdata.rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True).lower()}"
    if rdata.rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
        return rdata.target.to_text(omit_final_dot=True).lower()
    return rdata.to_text()


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------- the checks
def check_domain(
    expected: Expected,
    nameservers: Sequence[tuple[str, int]],
    *,
    now: datetime,
    timeout: float = 3.0,
) -> DomainCheck:
    """Ask DNS (nameservers: (host, port) pairs; empty: the system resolver) and compare with
    `expected`. No database; `now` only stamps the result."""
    resolver = _Dns(nameservers, timeout)
    with _CHECKDMARC:
        import checkdmarc.utils

        checkdmarc.utils.DNS_CACHE.clear()
        try:
            spf = _spf_checks(expected, resolver)
            dkim = _dkim_checks(expected, resolver)
            dmarc, dmarc_tags = _dmarc_checks(expected, resolver)
            return_path = _return_path_checks(expected, resolver)
        finally:
            checkdmarc.utils.DNS_CACHE.clear()
    alignment = _alignment_checks(expected, dkim, dmarc_tags)
    fcrdns = [_fcrdns(ip, resolver) for ip in expected.ips]
    return DomainCheck(
        expected.domain, [*spf, *dkim, *dmarc, *alignment, *return_path, *fcrdns], now
    )


def _spf_records(values: Iterable[str]) -> list[str]:
    """RFC 7208 4.5: the TXT records whose version section is exactly v=spf1."""
    return [v for v in values if v.lower() == "v=spf1" or v.lower().startswith("v=spf1 ")]


def _spf_checks(expected: Expected, resolver: _Dns) -> list[Check]:
    domain = expected.domain
    found = resolver.ask(domain, "TXT")
    record_check, record = _one_spf_record("spf.record", domain, expected.spf, found)
    if record is None:
        return [record_check]
    from checkdmarc.spf import (
        SPFError,
        SPFTooManyDNSLookups,
        SPFTooManyVoidDNSLookups,
        parse_spf_record,
    )

    checks = [record_check]
    try:
        parsed = parse_spf_record(
            record,
            domain,
            nameservers=resolver.nameservers,
            resolver=resolver.resolver,
            timeout=resolver.timeout,
            retries=0,
        )
    except SPFTooManyDNSLookups as exc:
        # The evaluation stops at the first limit passed, as a receiver's does (permerror);
        # the void lookups after that point are not counted, so that row is left out.
        count = (exc.data or {}).get("dns_lookups")
        checks.append(
            Check(
                "spf.lookups",
                False,
                f"the SPF record at {domain} needs {count} DNS lookups, more than the "
                f"{MAX_DNS_LOOKUPS} RFC 7208 4.6.4 allows (receivers answer permerror): "
                f"{exc}; flatten or remove includes",
                found=str(count),
                expected=f"<= {MAX_DNS_LOOKUPS}",
            )
        )
    except SPFTooManyVoidDNSLookups as exc:
        count = (exc.data or {}).get("void_dns_lookups")
        checks.append(
            Check(
                "spf.void_lookups",
                False,
                f"the SPF record at {domain} makes {count} lookups that find nothing, more "
                f"than the {MAX_VOID_LOOKUPS} RFC 7208 4.6.4 allows (receivers answer "
                f"permerror): {exc}; remove the terms naming names that do not exist",
                found=str(count),
                expected=f"<= {MAX_VOID_LOOKUPS}",
            )
        )
    except SPFError as exc:  # syntax, include or redirect loops, in this record or a nested one
        return [
            Check(
                "spf.record",
                False,
                f"the SPF record at {domain} does not evaluate: {exc}",
                found=record,
                expected=expected.spf,
            )
        ]
    else:
        lookups, voids = parsed["dns_lookups"], parsed["void_dns_lookups"]
        checks.append(
            Check(
                "spf.lookups",
                lookups <= MAX_DNS_LOOKUPS,
                f"{_count(lookups, 'DNS lookup')} (nested includes counted), within the "
                f"{MAX_DNS_LOOKUPS} RFC 7208 4.6.4 allows",
                found=str(lookups),
                expected=f"<= {MAX_DNS_LOOKUPS}",
            )
        )
        checks.append(
            Check(
                "spf.void_lookups",
                voids <= MAX_VOID_LOOKUPS,
                f"{_count(voids, 'lookup')} that find nothing, within the {MAX_VOID_LOOKUPS} "
                "RFC 7208 4.6.4 allows",
                found=str(voids),
                expected=f"<= {MAX_VOID_LOOKUPS}",
            )
        )
    checks.append(_include_check("spf.include", domain, record, expected.spf, resolver))
    return checks


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _one_spf_record(
    name: str, domain: str, wanted: str, found: _Answer
) -> tuple[Check, str | None]:
    if found.transient:
        return Check(
            name, False, found.describe("TXT", domain), expected=wanted, transient=True
        ), None
    records = _spf_records(found.values)
    if not records:
        where = (
            f"none of the TXT records at {domain} starts with v=spf1"
            if found.status == "answer"
            else found.describe("TXT", domain)
        )
        return Check(
            name, False, f"no SPF record: {where}; publish {wanted!r}", expected=wanted
        ), None
    if len(records) > 1:
        listed = "; ".join(repr(r) for r in records)
        return Check(
            name,
            False,
            f"{len(records)} SPF records at {domain}: {listed}. RFC 7208 4.5 allows one "
            "(receivers answer permerror); merge them into one",
            found=" | ".join(records),
            expected=wanted,
        ), None
    return Check(
        name, True, f"one SPF record at {domain}: {records[0]!r}", records[0], wanted
    ), records[0]


def _include_check(name: str, domain: str, record: str, ours: str, resolver: _Dns) -> Check:
    """The includes of `ours` (the record we ask for) reached from `record`, through includes
    and redirects, before an `all` ends the evaluation (terms after it are never looked at)."""
    wanted = _spf_includes(ours)
    reached, transient, path = _reach(domain, record, set(wanted), resolver)
    missing = [w for w in wanted if w not in reached]
    want_text = " ".join(f"include:{w}" for w in wanted)
    if not missing:
        via = {w: reached[w] for w in wanted}
        how = "; ".join(
            f"include:{w} " + ("directly" if chain == [domain] else "via " + " -> ".join(chain))
            for w, chain in via.items()
        )
        return Check(name, True, f"the SPF record at {domain} reaches {how}", record, want_text)
    reason = (
        f"the SPF record at {domain} does not reach "
        + ", ".join(f"include:{m}" for m in missing)
        + f" (records read: {', '.join(path)}); add it before the all term, e.g. {ours!r}"
    )
    if transient:
        reason += f"; some lookups failed ({transient}), so it may be there"
    return Check(name, False, reason, record, want_text, transient=bool(transient))


def _reach(
    domain: str, record: str, wanted: set[str], resolver: _Dns
) -> tuple[dict[str, list[str]], str, list[str]]:
    """{include target: the chain of domains that leads to it} for the wanted targets found,
    the first lookup failure if any, and the domains whose records were read."""
    reached: dict[str, list[str]] = {}
    failure = ""
    read = [domain]
    queue: list[tuple[str, str, list[str]]] = [(domain, record, [domain])]
    seen = {domain}
    while queue and len(read) <= _WALK_LIMIT:
        _owner, text, chain = queue.pop(0)
        for target, is_redirect in _spf_targets(text):
            if target in wanted and not is_redirect:
                reached.setdefault(target, chain)
            if target in seen or "%" in target:
                continue
            seen.add(target)
            answer = resolver.ask(target, "TXT")
            if answer.transient:
                failure = failure or answer.describe("TXT", target)
                continue
            records = _spf_records(answer.values)
            if len(records) == 1:
                read.append(target)
                queue.append((target, records[0], [*chain, target]))
    return reached, failure, read


def _spf_targets(record: str) -> list[tuple[str, bool]]:
    """(include or redirect target, is it a redirect), in order, up to the first `all`;
    a redirect only counts when there is no `all` (RFC 7208 6.1)."""
    out, redirect, ended = [], None, False
    for term in record.split()[1:]:
        lower = term.lower()
        if lower.lstrip("+-~?") == "all":
            ended = True
            break
        if lower.lstrip("+-~?").startswith("include:"):
            out.append((lower.split(":", 1)[1].rstrip("."), False))
        elif lower.startswith("redirect="):
            redirect = lower.split("=", 1)[1].rstrip(".")
    if redirect and not ended:
        out.append((redirect, True))
    return out


# --- DKIM
def _tags(record: str) -> dict[str, str]:
    """tag=value pairs (RFC 6376 3.2): names lower-cased, values stripped."""
    tags = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags[key.strip().lower()] = value.strip()
    return tags


def _dkim_key(record: str) -> tuple[str, str]:
    """(k=, p=) of a key record: k defaults to rsa; p with its whitespace removed."""
    tags = _tags(record)
    return tags.get("k", "rsa").lower(), re.sub(r"\s+", "", tags.get("p", ""))


def _dkim_checks(expected: Expected, resolver: _Dns) -> list[Check]:
    return [_dkim_check(key, resolver) for key in expected.dkim]


def _dkim_check(key: DkimExpected, resolver: _Dns) -> Check:
    name = f"dkim:{key.selector}"
    found = resolver.ask(key.name, "TXT")
    if found.transient:
        return Check(name, False, found.describe("TXT", key.name), None, key.value, transient=True)
    records = [v for v in found.values if "p=" in v.replace(" ", "")]
    if not records:
        return Check(
            name,
            False,
            f"no DKIM key at {key.name}: {found.describe('TXT', key.name)}; publish it as a "
            "TXT record",
            expected=key.value,
        )
    if len(records) > 1:
        return Check(
            name,
            False,
            f"{len(records)} TXT records at {key.name}; a selector names one key: keep ours only",
            found=" | ".join(records),
            expected=key.value,
        )
    want_k, want_p = _dkim_key(key.value)
    got_k, got_p = _dkim_key(records[0])
    if not got_p:
        reason = f"the key at {key.name} is revoked (empty p=)"
    elif got_k != want_k:
        reason = f"the key at {key.name} has k={got_k}, ours is k={want_k}"
    elif got_p != want_p:
        at = next(
            (i for i, (a, b) in enumerate(zip(got_p, want_p, strict=False)) if a != b),
            min(len(got_p), len(want_p)),
        )
        reason = (
            f"the key at {key.name} differs from ours from character {at + 1} of p= "
            f"(…{got_p[at : at + 8]}… vs ours …{want_p[at : at + 8]}…): copy the record "
            "again, whole"
        )
    else:
        return Check(name, True, f"{key.name} publishes our {want_k} key", records[0], key.value)
    return Check(name, False, reason, records[0], key.value)


# --- DMARC
def _dmarc_checks(expected: Expected, resolver: _Dns) -> tuple[list[Check], dict[str, str]]:
    """The rows, and the tags of the record that applies ({} when none does)."""
    from checkdmarc.dmarc import DMARCError, parse_dmarc_record, query_dmarc_record

    domain = expected.domain
    wanted = expected.dmarc or None
    own = resolver.ask(f"_dmarc.{domain}", "TXT")
    if own.transient:
        return [
            Check(
                "dmarc.record",
                False,
                own.describe("TXT", f"_dmarc.{domain}"),
                expected=wanted,
                transient=True,
            )
        ], {}
    options = {
        "nameservers": resolver.nameservers,
        "resolver": resolver.resolver,
        "timeout": resolver.timeout,
        "retries": 0,
        # Other TXT records beside the DMARC one are ignored by receivers (RFC 7489 6.6.3).
        "ignore_unrelated_records": True,
    }
    try:
        query = query_dmarc_record(domain, **options)
        location = query["location"]
        parsed = parse_dmarc_record(query["record"], location, **options)
    except DMARCError as exc:
        return [
            Check(
                "dmarc.record",
                False,
                f"no usable DMARC record for {domain}: {str(exc).rstrip('.')}"
                + (f"; publish {wanted!r} at _dmarc.{domain}" if wanted else ""),
                expected=wanted,
            )
        ], {}
    record = query["record"]
    tags = {k: v["value"] for k, v in parsed["tags"].items() if not isinstance(v["value"], list)}
    where = (
        f"_dmarc.{location}"
        if location == domain
        else f"_dmarc.{location} (the organisational domain's, applied to {domain})"
    )
    checks = [Check("dmarc.record", True, f"DMARC record at {where}: {record!r}", record, wanted)]
    checks.append(_policy_check(domain, location, parsed["tags"]))
    checks.append(_rua_check(domain, parsed, expected))
    return checks, {**tags, "_location": location}


def _policy_check(domain: str, location: str, tags: dict) -> Check:
    p = tags["p"]
    if not p["explicit"]:
        return Check(
            "dmarc.policy",
            False,
            f"the DMARC record at _dmarc.{location} has no p= tag; RFC 7489 requires one: "
            "add p=none at least",
            expected="p=none|quarantine|reject",
        )
    applied = tags["sp"]["value"] if location != domain else p["value"]
    which = "sp" if location != domain else "p"
    return Check(
        "dmarc.policy",
        True,
        f"policy {which}={applied} applies to {domain} (p=none is the least accepted)",
        found=f"{which}={applied}",
        expected="p=none|quarantine|reject",
    )


def _rua_check(domain: str, parsed: dict, expected: Expected) -> Check:
    wanted = expected.dmarc_rua
    want_text = ",".join(f"mailto:{a}" for a in wanted) or None
    rua = parsed["tags"].get("rua")
    addresses = [u["address"].lower() for u in (rua["value"] if rua else [])]
    found = ",".join(f"mailto:{a}" for a in addresses) or None
    ours = [a for a in addresses if a in wanted]
    if not wanted:
        return Check("dmarc.rua", True, "no report address is asked for", found, None, level="warn")
    if ours:
        notes = [w for w in parsed["warnings"] if any(a.split("@")[-1] in w for a in ours)]
        note = f" (checkdmarc notes: {'; '.join(notes)})" if notes else ""
        return Check(
            "dmarc.rua",
            True,
            f"aggregate reports for {domain} go to {', '.join(ours)}, which the relay reads" + note,
            found,
            want_text,
            level="warn",
        )
    return Check(
        "dmarc.rua",
        False,
        f"aggregate reports for {domain} go to {found or 'nobody (no rua=)'}, not to "
        f"{want_text}: the relay cannot watch DMARC results for the domain (delivery is not "
        "affected)",
        found,
        want_text,
        level="warn",
    )


# --- alignment
def _alignment_checks(expected: Expected, dkim: list[Check], dmarc: dict[str, str]) -> list[Check]:
    domain = expected.domain
    good = [c.name.split(":", 1)[1] for c in dkim if c.ok]
    if good:
        dkim_check = Check(
            "alignment.dkim",
            True,
            f"we sign with d={domain}, the header From domain (aligned, strict or relaxed); "
            f"published right: {', '.join(good)}",
            found=f"d={domain}",
            expected=f"From: …@{domain}",
        )
    else:
        dkim_check = Check(
            "alignment.dkim",
            False,
            f"we sign with d={domain}, but none of our DKIM keys is published right, so no "
            "signature verifies and DKIM cannot align",
            expected=f"From: …@{domain}",
            transient=any(c.transient for c in dkim),
        )
    rp = expected.return_path_domain
    rp_org, from_org = organisational_domain(rp), organisational_domain(domain)
    found = f"{rp} (organisational domain {rp_org})"
    want = f"organisational domain {from_org}"
    if rp_org != from_org:
        rp_check = Check(
            "alignment.return_path",
            False,
            f"the return path {rp} has organisational domain {rp_org}, the From domain "
            f"{domain} has {from_org} (Public Suffix List): SPF cannot align",
            found,
            want,
            owner="relay",
        )
    elif dmarc.get("aspf") == "s" and rp != domain:
        rp_check = Check(
            "alignment.return_path",
            False,
            f"the DMARC record asks for strict SPF alignment (aspf=s), and the return path {rp} "
            f"is not {domain} itself: DMARC will pass through DKIM alone (aspf=r aligns it)",
            found,
            f"{want}, aspf=r",
            level="warn",
        )
    else:
        rp_check = Check(
            "alignment.return_path",
            True,
            f"the return path {rp} and the From domain {domain} share the organisational "
            f"domain {from_org} (Public Suffix List): relaxed SPF alignment holds",
            found,
            want,
            owner="relay",
        )
    return [dkim_check, rp_check]


# --- the return-path subdomain
def _return_path_checks(expected: Expected, resolver: _Dns) -> list[Check]:
    rp = expected.return_path_domain
    wanted = set(expected.return_path_mx)
    want_text = ", ".join(f"MX {h}" for h in sorted(wanted))
    mx = resolver.ask(rp, "MX")
    if mx.transient:
        mx_check = Check(
            "return_path.mx", False, mx.describe("MX", rp), None, want_text, transient=True
        )
    else:
        hosts = {v.split()[-1] for v in mx.values}
        found = ", ".join(mx.values) or None
        if hosts and hosts == wanted:
            mx_check = Check(
                "return_path.mx",
                True,
                f"{rp} MX: {found} (the relay's inbound host)",
                found,
                want_text,
            )
        elif not hosts:
            mx_check = Check(
                "return_path.mx",
                False,
                f"{mx.describe('MX', rp)}: bounces to the return path cannot reach the relay; "
                f"publish {rp}. MX 10 {' '.join(sorted(wanted))}.",
                found,
                want_text,
            )
        else:
            others = sorted(hosts - wanted)
            lacking = sorted(wanted - hosts)
            what = []
            if lacking:
                what.append(f"it does not name {', '.join(lacking)}")
            if others:
                what.append(f"it names {', '.join(others)}, which is not the relay")
            mx_check = Check(
                "return_path.mx",
                False,
                f"{rp} MX is {found}: {' and '.join(what)}; bounces must reach the relay only",
                found,
                want_text,
            )
    txt = resolver.ask(rp, "TXT")
    spf_check, record = _one_spf_record("return_path.spf", rp, expected.return_path_spf, txt)
    if record is not None:
        spf_check = _include_check(
            "return_path.spf", rp, record, expected.return_path_spf, resolver
        )
    return [mx_check, spf_check]


# --- forward-confirmed reverse DNS
def _fcrdns(ip: SourceIp, resolver: _Dns) -> Check:
    name = f"fcrdns:{ip.address}"
    address = ipaddress.ip_address(ip.address)
    reverse = dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)
    ptr = resolver.ask(reverse, "PTR")
    want = f"PTR {ip.ptr_name} with A/AAAA {ip.address}" if ip.ptr_name else None
    if ptr.transient or not ptr.values:
        return Check(
            name,
            False,
            f"no PTR for {ip.address}: {ptr.describe('PTR', reverse)}",
            None,
            want,
            owner="relay",
            transient=ptr.transient,
        )
    seen = []
    failed = ""
    for host in ptr.values:
        forward = resolver.addresses(host)
        if forward.transient:
            failed = failed or forward.describe("A/AAAA", host)
        if any(_same_ip(address, v) for v in forward.values):
            note = f" (the pool says {ip.ptr_name})" if ip.ptr_name and ip.ptr_name != host else ""
            return Check(
                name,
                True,
                f"{ip.address} -> PTR {host} -> {', '.join(forward.values)}: forward-confirmed"
                + note,
                host,
                want,
                owner="relay",
            )
        seen.append(f"{host} -> {', '.join(forward.values) or forward.status}")
    return Check(
        name,
        False,
        f"{ip.address} has PTR {', '.join(ptr.values)}, but no such name resolves back to it "
        f"({'; '.join(seen)})" + (f"; {failed}" if failed else ""),
        ", ".join(ptr.values),
        want,
        owner="relay",
        transient=bool(failed),
    )


def _same_ip(address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


# ---------------------------------------------------------------- with the database
def check_and_record(
    session: Session, domain_name: str, settings: Settings, *, now: datetime
) -> DomainCheck:
    """Check DOMAIN's DNS as configured (AXIOM_DNS_NAMESERVERS) and store the table in
    Domain.dns_checks; the caller commits. An observation, not a decision: no audit entry (the
    runbooks that act on it audit what they do, with the table as evidence)."""
    from config.settings import parse_nameserver

    expected = expected_records(session, domain_name, settings.hostname, settings.dmarc_mailbox)
    nameservers = [parse_nameserver(entry) for entry in settings.dns_nameservers]
    result = check_domain(expected, nameservers, now=now)
    domain = get_domain(session, domain_name)
    domain.dns_checks = result.as_json()
    domain.dns_checked_at = now
    session.add(domain)
    return result


def check_ip(address: str, ptr_name: str | None, settings: Settings, timeout: float = 3.0) -> Check:
    """Forward-confirmed reverse DNS of one sending IP, as the domain checks do it: the warm-up
    runbook shows it as evidence before an IP starts warming (a receiver refuses an IP whose
    PTR does not confirm, whatever its volume)."""
    from config.settings import parse_nameserver

    nameservers = [parse_nameserver(entry) for entry in settings.dns_nameservers]
    return _fcrdns(SourceIp(address, ptr_name), _Dns(nameservers, timeout))
