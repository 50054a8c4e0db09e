"""DNS for delivery: where a domain's mail goes, and the PTR and TXT lookups around it.

`Resolver.resolve_mx(domain)` answers an `MxResult`: the delivery targets in the order to try
them (MX preference, shuffled among equals as RFC 5321 5.1 asks; the domain itself when it has
no MX), each with its addresses; or a `DnsFailure` classified once, here:

    null MX (RFC 7505)                      permanent  5.1.10
    NXDOMAIN, no MX and no A/AAAA, bad name permanent  5.1.2
    every MX host without an address        permanent  5.4.4
    SERVFAIL, timeout, no nameserver answer transient  4.4.3

Answers (including NXDOMAIN and NODATA, RFC 2308) are cached for their TTL on an injectable
clock; failures to get an answer are not cached. All network I/O is dnspython's asyncio
resolver, so nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger("axiom.dns")

Status = Literal["answer", "nxdomain", "nodata", "error"]

NULL_MX = "5.1.10"
BAD_DESTINATION = "5.1.2"
NO_ROUTE = "5.4.4"
DNS_UNAVAILABLE = "4.4.3"

_LDH = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Lookup:
    """One DNS question and what came of it. `error` (SERVFAIL, timeout, nobody answered) is the
    only transient status; NXDOMAIN and NODATA are answers too."""

    name: str
    rdtype: str
    status: Status
    values: tuple[str, ...] = ()
    ttl: int = 0
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.status == "answer" and bool(self.values)

    @property
    def transient(self) -> bool:
        return self.status == "error"

    @property
    def value(self) -> str | None:
        """The first value, if any (a PTR name, say)."""
        return self.values[0] if self.values else None


@dataclass(frozen=True)
class DnsFailure:
    permanent: bool
    enhanced_code: str
    kind: str  # null_mx | nxdomain | no_mail_records | mx_unresolvable | invalid_domain | dns_error
    reason: str


@dataclass(frozen=True)
class MxTarget:
    host: str  # the MX exchange (no trailing dot), or the domain itself for an implicit MX
    preference: int
    addresses: tuple[str, ...]  # IPv4 first, then IPv6


@dataclass(frozen=True)
class MxResult:
    domain: str
    targets: tuple[MxTarget, ...] = ()
    failure: DnsFailure | None = None
    implicit: bool = False  # no MX: the domain's own A/AAAA (RFC 5321 5.1)
    skipped: tuple[str, ...] = ()  # MX hosts left out: no address, or their lookup failed

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def permanent(self) -> bool:
        return self.failure is not None and self.failure.permanent

    @property
    def transient(self) -> bool:
        return self.failure is not None and not self.failure.permanent

    def endpoints(self) -> Iterator[tuple[str, str]]:
        """(MX host, address) pairs in the order to try them."""
        for target in self.targets:
            for address in target.addresses:
                yield target.host, address


class Backend(Protocol):
    async def query(self, name: str, rdtype: str) -> Lookup: ...


class DnspythonBackend:
    """Questions to real nameservers through dns.asyncresolver, answers turned into Lookups."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 2.0,
        lifetime: float = 5.0,
    ):
        if nameservers:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        else:
            try:
                self.resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                log.warning("no system resolver configured; every DNS lookup will fail")
                self.resolver = dns.asyncresolver.Resolver(configure=False)
                self.resolver.nameservers = []
        self.resolver.timeout = timeout
        self.resolver.lifetime = lifetime
        self.resolver.retry_servfail = False
        self.resolver.cache = None

    async def query(self, name: str, rdtype: str) -> Lookup:
        qname = dns.name.from_text(name)
        try:
            answer = await self.resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return Lookup(name, rdtype, "nxdomain", ttl=_negative_ttl(exc, qname))
        except dns.resolver.LifetimeTimeout as exc:
            return Lookup(name, rdtype, "error", detail=f"timeout: {exc}")
        except dns.resolver.NoNameservers as exc:
            return Lookup(name, rdtype, "error", detail=_no_nameservers(exc))
        except (dns.exception.DNSException, OSError) as exc:
            return Lookup(name, rdtype, "error", detail=f"{type(exc).__name__}: {exc}")
        ttl = answer.chaining_result.minimum_ttl
        if answer.rrset is None:
            return Lookup(name, rdtype, "nodata", ttl=ttl)
        return Lookup(name, rdtype, "answer", tuple(_text(rd) for rd in answer.rrset), ttl)


def _text(rdata) -> str:
    if rdata.rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {rdata.exchange.to_text()}"
    if rdata.rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", errors="replace")
    if rdata.rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME):
        return rdata.target.to_text(omit_final_dot=True).lower()
    return rdata.to_text()


def _negative_ttl(exc: dns.resolver.NXDOMAIN, qname: dns.name.Name) -> int:
    try:
        return exc.response(qname).resolve_chaining().minimum_ttl
    except Exception:  # no usable response kept: do not cache it
        return 0


def _no_nameservers(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    parts = []
    for error in errors:  # (server, tcp, port, exception or None, response or None)
        server, _tcp, _port, err, response = (*error, None, None, None, None, None)[:5]
        where = str(server)
        if response is not None:
            parts.append(f"{dns.rcode.to_text(response.rcode())} from {where}")
        else:
            parts.append(f"{err} ({where})")
    return "no nameserver answered: " + ("; ".join(parts) or "none configured")


@dataclass
class _Entry:
    expires: float
    lookup: Lookup


@dataclass
class Resolver:
    """The relay's resolver. Build it with `Resolver.from_settings(settings)`; in tests, give it
    a fake `backend`, a `clock` to age the cache and a seeded `rng`."""

    backend: Backend
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    max_ttl: int = 86400
    max_negative_ttl: int = 3600
    max_entries: int = 10000
    max_mx_hosts: int = 10
    deadline: float = 15.0  # seconds for one resolve_mx, whatever the nameservers do
    _cache: dict[tuple[str, str], _Entry] = field(default_factory=dict, init=False, repr=False)
    _inflight: dict[tuple[str, str], asyncio.Future[Lookup]] = field(
        default_factory=dict, init=False, repr=False
    )

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> Resolver:
        from config.settings import parse_nameserver

        nameservers = [parse_nameserver(entry) for entry in settings.dns_nameservers]
        return cls(DnspythonBackend(nameservers), **options)

    @classmethod
    def at(
        cls,
        nameservers: Sequence[tuple[str, int]],
        *,
        timeout: float = 2.0,
        lifetime: float = 5.0,
        **options,
    ) -> Resolver:
        """A resolver asking these nameservers, with dnspython's per-try and overall limits."""
        return cls(DnspythonBackend(nameservers, timeout=timeout, lifetime=lifetime), **options)

    # --- MX ---
    async def resolve_mx(self, domain: str) -> MxResult:
        if domain.strip().startswith("["):
            literal = _address_literal(domain)
            if literal is None:
                return _fail(domain, True, BAD_DESTINATION, "invalid_domain", "bad address literal")
            return MxResult(domain, (MxTarget(literal, 0, (literal,)),), implicit=True)
        name = _mail_domain(domain)
        if name is None:
            return _fail(domain, True, BAD_DESTINATION, "invalid_domain", "not a valid domain")
        try:
            async with asyncio.timeout(self.deadline):
                return await self._resolve_mx(name)
        except TimeoutError:
            return _fail(name, False, DNS_UNAVAILABLE, "dns_error", "DNS lookup timed out")

    async def _resolve_mx(self, domain: str) -> MxResult:
        mx = await self.lookup(domain, "MX")
        if mx.transient:
            return _fail(domain, False, DNS_UNAVAILABLE, "dns_error", f"MX lookup: {mx.detail}")
        if mx.status == "nxdomain":
            return _fail(domain, True, BAD_DESTINATION, "nxdomain", "domain does not exist")
        if not mx.found:
            return await self._implicit_mx(domain)

        records = [_parse_mx(value) for value in mx.values]
        if all(host == "" for _pref, host in records):
            return _fail(domain, True, NULL_MX, "null_mx", "domain accepts no mail (null MX)")
        best: dict[str, int] = {}
        for pref, host in records:
            if host and pref < best.get(host, 1 << 16):
                best[host] = pref  # a null MX beside real ones is ignored (RFC 7505 3)
        hosts = self._ordered(best)[: self.max_mx_hosts]
        found = await asyncio.gather(*(self.addresses(host) for host, _pref in hosts))
        targets = tuple(
            MxTarget(host, pref, addrs.values)
            for (host, pref), addrs in zip(hosts, found, strict=True)
            if addrs.found
        )
        skipped = tuple(
            host for (host, _p), addrs in zip(hosts, found, strict=True) if not addrs.found
        )
        if targets:
            return MxResult(domain, targets, skipped=skipped)
        errors = [a for a in found if a.transient]
        if errors:
            return _fail(
                domain, False, DNS_UNAVAILABLE, "dns_error", f"MX host lookup: {errors[0].detail}"
            )
        return _fail(domain, True, NO_ROUTE, "mx_unresolvable", "no MX host has an address")

    async def _implicit_mx(self, domain: str) -> MxResult:
        addrs = await self.addresses(domain)
        if addrs.found:
            return MxResult(domain, (MxTarget(domain, 0, addrs.values),), implicit=True)
        if addrs.transient:
            return _fail(
                domain, False, DNS_UNAVAILABLE, "dns_error", f"address lookup: {addrs.detail}"
            )
        if addrs.status == "nxdomain":
            return _fail(domain, True, BAD_DESTINATION, "nxdomain", "domain does not exist")
        return _fail(domain, True, BAD_DESTINATION, "no_mail_records", "no MX and no A/AAAA")

    def _ordered(self, best: dict[str, int]) -> list[tuple[str, int]]:
        """By preference; within one preference in a fresh random order each time."""
        groups: dict[int, list[str]] = {}
        for host, pref in sorted(best.items()):
            groups.setdefault(pref, []).append(host)
        ordered = []
        for pref in sorted(groups):
            hosts = groups[pref]
            self.rng.shuffle(hosts)
            ordered.extend((host, pref) for host in hosts)
        return ordered

    # --- addresses, PTR, TXT ---
    async def addresses(self, name: str) -> Lookup:
        """A and AAAA together: an answer if either has addresses, an error only if neither
        does and one of them failed."""
        name = _ascii_name(name)
        a, aaaa = await asyncio.gather(self.lookup(name, "A"), self.lookup(name, "AAAA"))
        values = (a.values if a.found else ()) + (aaaa.values if aaaa.found else ())
        ttl = min(a.ttl, aaaa.ttl)
        if values:
            return Lookup(name, "A+AAAA", "answer", values, ttl)
        for part in (a, aaaa):
            if part.transient:
                return Lookup(name, "A+AAAA", "error", detail=f"{part.rdtype}: {part.detail}")
        status: Status = "nxdomain" if "nxdomain" in (a.status, aaaa.status) else "nodata"
        return Lookup(name, "A+AAAA", status, ttl=ttl)

    async def ptr_name(self, ip: str) -> Lookup:
        """The PTR of an IPv4 or IPv6 address; `.value` is the name without the final dot."""
        reverse = dns.reversename.from_address(str(ipaddress.ip_address(ip)))
        return await self.lookup(reverse.to_text(omit_final_dot=True), "PTR")

    async def txt(self, name: str) -> Lookup:
        """TXT records, each one's strings joined into one text."""
        return await self.lookup(name, "TXT")

    # --- the cache ---
    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """One question, answered from the cache while its TTL lasts; concurrent askers of the
        same question share one query. ValueError if name cannot be a DNS name."""
        key = (_ascii_name(name), rdtype.upper())
        entry = self._cache.get(key)
        if entry is not None:
            if self.clock() < entry.expires:
                return entry.lookup
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(key))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _f, key=key: self._inflight.pop(key, None))
        return await asyncio.shield(pending)

    async def _ask(self, key: tuple[str, str]) -> Lookup:
        lookup = await self.backend.query(*key)
        if lookup.status == "error":
            return lookup
        cap = self.max_ttl if lookup.status == "answer" else self.max_negative_ttl
        ttl = min(max(lookup.ttl, 0), cap)
        if ttl > 0:
            self._store(key, _Entry(self.clock() + ttl, lookup))
        return lookup

    def _store(self, key: tuple[str, str], entry: _Entry) -> None:
        if len(self._cache) >= self.max_entries:
            now = self.clock()
            for stale in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[stale]
            while len(self._cache) >= self.max_entries:
                del self._cache[next(iter(self._cache))]  # the oldest stored
        self._cache[key] = entry

    def forget(self) -> None:
        self._cache.clear()


def _fail(domain: str, permanent: bool, code: str, kind: str, reason: str) -> MxResult:
    return MxResult(domain, failure=DnsFailure(permanent, code, kind, f"{domain}: {reason}"))


def _parse_mx(value: str) -> tuple[int, str]:
    pref, _, host = value.partition(" ")
    return int(pref), host.rstrip(".").lower()


@functools.lru_cache(maxsize=16384)
def _ascii_name(name: str) -> str:
    """Lower case, no final dot, IDNA A-labels; ValueError when it cannot be a DNS name.
    Remembered: dnspython's parse and print was ~9 % of the delivering process's CPU, and
    a relay sees the same few thousand domains over and over (errors are not remembered)."""
    text = name.strip().rstrip(".")
    try:
        if not text:
            raise ValueError("empty name")
        return dns.name.from_text(text).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise ValueError(f"not a DNS name: {name!r} ({exc})") from None


def _mail_domain(domain: str) -> str | None:
    """The domain of an address as a host name (RFC 5321 4.1.2), or None."""
    try:
        name = _ascii_name(domain)
    except ValueError:
        return None
    labels = name.split(".")
    return name if len(labels) > 1 and all(_LDH.match(label) for label in labels) else None


def _address_literal(domain: str) -> str | None:
    """An RFC 5321 address literal, [192.0.2.1] or [IPv6:2001:db8::1], as an address."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None
