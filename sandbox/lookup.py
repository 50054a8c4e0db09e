"""How the simulated receivers ask DNS: over the wire to the sandbox DNS.

Receivers look up what a real MX would (DNSBL entries, PTR and its forward name, SPF, DKIM keys,
DMARC policies), so a listing or an override the CLI makes is seen by the next message.

Given the world's zone (`zone`, a callable returning the one being served), a lookup keeps its
answers for as long as that zone is served, as a receiver's caching resolver would within a
record's TTL: the world never changes a zone, it builds a new one for every listing, override
or published record, so the first question after a change goes over the wire again and the
cache can never answer from an older zone. Answers that were errors are never kept. Without
`zone` (the scenarios' readiness probe) every question goes over the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

Status = Literal["answer", "nxdomain", "nodata", "error"]


@dataclass(frozen=True)
class Found:
    status: Status
    values: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "answer"


CACHED_ANSWERS = 20_000  # per zone; a zone lives until the world's next change


class SandboxLookup:
    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 2.0,
        zone: Callable[[], object] | None = None,
    ):
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout * 2
        self._resolver.cache = None
        self._zone = zone
        self._cached_for: object | None = None
        self._cache: dict[tuple[str, str], Found] = {}
        self.asked = 0  # questions that went over the wire (tests/unit/test_sandbox_zones.py)

    async def query(self, name: str, rdtype: str) -> Found:
        if self._zone is None:
            return await self._ask(name, rdtype)
        zone = self._zone()
        if zone is not self._cached_for:
            self._cache.clear()
            self._cached_for = zone
        key = (name.rstrip(".").lower(), rdtype)
        found = self._cache.get(key)
        if found is None:
            found = await self._ask(name, rdtype)
            kept = found.status != "error" and len(self._cache) < CACHED_ANSWERS
            if kept and self._zone() is zone:  # not an answer from a zone replaced meanwhile
                self._cache[key] = found
        return found

    async def _ask(self, name: str, rdtype: str) -> Found:
        self.asked += 1
        try:
            answer = await self._resolver.resolve(
                name.rstrip(".") + ".", rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Found("nxdomain")
        except (dns.exception.DNSException, OSError):
            return Found("error")
        if answer.rrset is None:
            return Found("nodata")
        return Found("answer", tuple(_text(rd) for rd in answer.rrset))

    async def txt(self, name: str) -> Found:
        return await self.query(name, "TXT")

    async def ptr(self, ip: str) -> Found:
        return await self.query(dns.reversename.from_address(ip).to_text(), "PTR")


def _text(rdata) -> str:
    if hasattr(rdata, "strings"):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if hasattr(rdata, "exchange"):
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True).lower()}"
    if hasattr(rdata, "target"):
        return rdata.target.to_text(omit_final_dot=True).lower()
    return rdata.to_text()
