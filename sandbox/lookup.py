"""How the simulated receivers ask DNS: over the wire to the sandbox DNS, never from a cache.

Receivers look up what a real MX would (DNSBL entries, PTR and its forward name, SPF, DKIM keys,
DMARC policies), so a listing or an override the CLI makes is seen by the next message.
"""

from __future__ import annotations

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


class SandboxLookup:
    def __init__(self, host: str, port: int, timeout: float = 2.0):
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout * 2
        self._resolver.cache = None

    async def query(self, name: str, rdtype: str) -> Found:
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
