"""Message authentication as a receiver sees it: SPF (RFC 7208), DKIM (dkimpy), DMARC (RFC 7489).

All DNS goes to the sandbox DNS through `SandboxLookup`. dkimpy does the DKIM verification
itself, in a worker thread, from key records fetched beforehand without blocking the loop.
The organisational domain (DMARC relaxed alignment, RFC 7489 3.2) comes from the Public Suffix
List as the publicsuffixlist package ships it (offline), never "the last two labels": under
co.uk, shop.co.uk is one, not co.uk. Simplifications, each safe for the sandbox's own domains:
SPF macros and the `ptr` mechanism are not evaluated (a macro is a permerror, `ptr` never
matches), and `exp=` is ignored.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses

import dkim
import dkim.util
from publicsuffixlist import PublicSuffixList

from sandbox.lookup import SandboxLookup

log = logging.getLogger("axiom.sandbox.auth")
MAX_DNS_TERMS = 10  # RFC 7208 4.6.4
MAX_VOID_LOOKUPS = 2
_QUALIFIER = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


# ---------------------------------------------------------------- SPF
class _SpfError(Exception):
    def __init__(self, result: str):
        super().__init__(result)
        self.result = result


@dataclass
class _Budget:
    terms: int = 0
    voids: int = 0

    def spend(self) -> None:
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise _SpfError("permerror")

    def void(self) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _SpfError("permerror")


async def check_spf(ip: str, domain: str, lookup: SandboxLookup) -> str:
    """pass, fail, softfail, neutral, none, temperror or permerror for ip sending as domain."""
    try:
        return await _check_host(ipaddress.ip_address(ip), domain.lower(), lookup, _Budget())
    except _SpfError as exc:
        return exc.result


async def _check_host(ip, domain: str, lookup: SandboxLookup, budget: _Budget) -> str:
    found = await lookup.txt(domain)
    if found.status == "error":
        return "temperror"
    records = [v for v in found.values if v.lower() == "v=spf1" or v.lower().startswith("v=spf1 ")]
    if not records:
        return "none"
    if len(records) > 1:
        return "permerror"
    redirect = None
    for term in records[0].split()[1:]:
        if "%" in term:
            return "permerror"
        name, eq, value = term.partition("=")
        if eq and ":" not in name and "/" not in name:
            if name.lower() == "redirect":
                redirect = value
            continue  # exp= and unknown modifiers are ignored (RFC 7208 6)
        qualifier = "+"
        if term[0] in _QUALIFIER:
            qualifier, term = term[0], term[1:]
        if await _matches(ip, term, domain, lookup, budget):
            return _QUALIFIER[qualifier]
    if redirect is not None:
        budget.spend()
        result = await _check_host(ip, redirect.lower(), lookup, budget)
        return "permerror" if result == "none" else result
    return "neutral"


async def _matches(ip, term: str, domain: str, lookup: SandboxLookup, budget: _Budget) -> bool:
    mechanism, _, rest = term.partition(":")
    mechanism = mechanism.lower()
    cidr4, cidr6 = 32, 128
    if "/" in mechanism:  # a/24, mx/24//64
        mechanism, _, lengths = mechanism.partition("/")
        cidr4, cidr6 = _cidrs(lengths)
    elif "/" in rest and mechanism in ("a", "mx"):
        rest, _, lengths = rest.partition("/")
        cidr4, cidr6 = _cidrs(lengths)
    target = (rest or domain).lower()
    if mechanism == "all":
        return True
    if mechanism in ("ip4", "ip6"):
        try:
            return ip in ipaddress.ip_network(rest, strict=False)
        except ValueError:
            raise _SpfError("permerror") from None
    if mechanism == "include":
        budget.spend()
        result = await _check_host(ip, target, lookup, budget)
        if result in ("temperror", "permerror"):
            raise _SpfError(result)
        if result == "none":
            raise _SpfError("permerror")
        return result == "pass"
    if mechanism == "a":
        budget.spend()
        return _in_any(ip, await _addresses(target, lookup, budget), cidr4, cidr6)
    if mechanism == "mx":
        budget.spend()
        found = await lookup.query(target, "MX")
        if found.status == "error":
            raise _SpfError("temperror")
        if not found.ok:
            budget.void()
        for value in found.values[:10]:
            host = value.split()[-1]
            if _in_any(ip, await _addresses(host, lookup, budget), cidr4, cidr6):
                return True
        return False
    if mechanism == "exists":
        budget.spend()
        return bool(await _addresses(target, lookup, budget, kinds=("A",)))
    if mechanism == "ptr":
        budget.spend()
        return False
    raise _SpfError("permerror")


def _cidrs(lengths: str) -> tuple[int, int]:
    four, _, six = lengths.partition("//")
    try:
        return int(four or 32), int(six or 128)
    except ValueError:
        raise _SpfError("permerror") from None


async def _addresses(
    name: str, lookup: SandboxLookup, budget: _Budget, kinds=("A", "AAAA")
) -> list[str]:
    out: list[str] = []
    for kind in kinds:
        found = await lookup.query(name, kind)
        if found.status == "error":
            raise _SpfError("temperror")
        out += found.values
    if not out:
        budget.void()
    return out


def _in_any(ip, addresses: list[str], cidr4: int, cidr6: int) -> bool:
    for text in addresses:
        address = ipaddress.ip_address(text)
        length = cidr4 if address.version == 4 else cidr6
        if address.version == ip.version and ip in ipaddress.ip_network(
            f"{address}/{length}", strict=False
        ):
            return True
    return False


# ---------------------------------------------------------------- DKIM
@dataclass(frozen=True)
class DkimResult:
    domain: str
    selector: str
    algorithm: str
    result: str  # pass, fail, permerror (no or bad key), temperror (DNS failed)


async def check_dkim(data: bytes, lookup: SandboxLookup) -> tuple[DkimResult, ...]:
    try:
        parsed = dkim.DKIM(data)
    except Exception:
        return ()
    signatures = [v for k, v in parsed.headers if k.lower() == b"dkim-signature"]
    tags = []
    for value in signatures:
        try:
            tags.append(dkim.util.parse_tag_value(value))
        except Exception:
            tags.append({})
    keys: dict[bytes, bytes | None] = {}
    failed: set[bytes] = set()
    for tag in tags:
        if b"d" not in tag or b"s" not in tag:
            continue
        name = tag[b"s"] + b"._domainkey." + tag[b"d"] + b"."
        found = await lookup.txt(name.decode("ascii", "replace"))
        if found.status == "error":
            failed.add(name)
        keys[name] = found.values[0].encode() if found.ok and found.values else None
    results = await asyncio.to_thread(_verify_each, data, tags, keys)
    return tuple(
        DkimResult(domain, selector, algorithm, "temperror" if key in failed else result)
        for domain, selector, algorithm, key, result in results
    )


def _verify_each(data: bytes, tags: list[dict], keys: dict[bytes, bytes | None]):
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return keys.get(name)

    out = []
    for index, tag in enumerate(tags):
        domain = tag.get(b"d", b"").decode("ascii", "replace").lower()
        selector = tag.get(b"s", b"").decode("ascii", "replace")
        algorithm = tag.get(b"a", b"").decode("ascii", "replace")
        key_name = tag.get(b"s", b"") + b"._domainkey." + tag.get(b"d", b"") + b"."
        if keys.get(key_name) is None:
            out.append((domain, selector, algorithm, key_name, "permerror"))
            continue
        try:
            ok = dkim.DKIM(data, logger=log).verify(idx=index, dnsfunc=dnsfunc)
        except Exception as exc:  # dkimpy raises on malformed signatures
            log.debug("DKIM signature %d: %s", index, exc)
            ok = False
        out.append((domain, selector, algorithm, key_name, "pass" if ok else "fail"))
    return out


# ---------------------------------------------------------------- DMARC
@dataclass(frozen=True)
class Authentication:
    spf: str
    spf_domain: str
    dkim: tuple[DkimResult, ...]
    from_domain: str | None
    dmarc: str  # pass, fail, none (no record), temperror
    dmarc_policy: str | None  # the policy that applies to the From domain

    @property
    def spf_pass(self) -> bool:
        return self.spf == "pass"

    @property
    def dkim_pass(self) -> bool:
        return any(d.result == "pass" for d in self.dkim)

    def header(self, authserv_id: str) -> str:
        parts = [authserv_id]
        if self.dkim:
            parts += [
                f"dkim={d.result} header.d={d.domain} header.s={d.selector} header.a={d.algorithm}"
                for d in self.dkim
            ]
        else:
            parts.append("dkim=none")
        parts.append(f"spf={self.spf} smtp.mailfrom={self.spf_domain}")
        policy = f" (p={self.dmarc_policy.upper()})" if self.dmarc_policy else ""
        parts.append(f"dmarc={self.dmarc}{policy} header.from={self.from_domain or ''}")
        return "Authentication-Results: " + ";\r\n\t".join(parts)


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    # Private section included (RFC 7489 3.2); a name under an unknown TLD (.test) counts as
    # under a public suffix, so relay.axiom.test's is axiom.test.
    return PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """The public suffix plus one label; a name that is itself a public suffix is its own."""
    name = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(name) or name


def _aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower(), b.lower()
    return a == b if mode == "s" else organisational_domain(a) == organisational_domain(b)


def header_from_domain(data: bytes) -> str | None:
    headers = BytesHeaderParser().parsebytes(data)
    values = headers.get_all("From") or []
    addresses = [a for _, a in getaddresses([str(v) for v in values]) if "@" in a]
    if len(addresses) != 1:
        return None
    return addresses[0].rpartition("@")[2].lower()


async def _dmarc_record(domain: str, lookup: SandboxLookup) -> tuple[str, dict[str, str] | None]:
    """('found'|'none'|'error', tags) for the record at the domain, else its organisation."""
    for name in dict.fromkeys([domain, organisational_domain(domain)]):
        found = await lookup.txt(f"_dmarc.{name}")
        if found.status == "error":
            return "error", None
        records = [v for v in found.values if v.replace(" ", "").lower().startswith("v=dmarc1")]
        if len(records) == 1:
            tags = {}
            for part in records[0].split(";"):
                key, _, value = part.strip().partition("=")
                tags[key.strip().lower()] = value.strip().lower()
            tags["_at"] = name
            return "found", tags
    return "none", None


async def authenticate(
    data: bytes, mail_from: str, helo: str, ip: str, lookup: SandboxLookup
) -> Authentication:
    spf_domain = (mail_from.rpartition("@")[2] if mail_from else helo).lower()
    spf, signatures = await asyncio.gather(
        check_spf(ip, spf_domain, lookup), check_dkim(data, lookup)
    )
    from_domain = header_from_domain(data)
    if from_domain is None:
        return Authentication(spf, spf_domain, signatures, None, "permerror", None)
    status, tags = await _dmarc_record(from_domain, lookup)
    if status == "error":
        return Authentication(spf, spf_domain, signatures, from_domain, "temperror", None)
    if tags is None:
        return Authentication(spf, spf_domain, signatures, from_domain, "none", None)
    at_org = tags["_at"] != from_domain
    policy = tags.get("sp", tags.get("p", "none")) if at_org else tags.get("p", "none")
    passed = (spf == "pass" and _aligned(spf_domain, from_domain, tags.get("aspf", "r"))) or any(
        d.result == "pass" and _aligned(d.domain, from_domain, tags.get("adkim", "r"))
        for d in signatures
    )
    return Authentication(
        spf, spf_domain, signatures, from_domain, "pass" if passed else "fail", policy
    )
