"""What the sandbox DNS knows: records built from behaviour.yaml and the database, and DNSBL answers.

Records are plain data (`Rr`); `Zone.answer(name, type)` decides NOERROR, NODATA or NXDOMAIN the
way an authoritative server would, and synthesises blocklist answers from the listings in the
state file: A records with the list's return codes and a TXT reason (RFC 5782), with the test
points every DNSBL keeps (127.0.0.2 / `test` listed, 127.0.0.1 / `invalid` never).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sandbox.authn import organisational_domain
from sandbox.behaviour import Behaviour, DnsblZone
from sandbox.state import Listing, Override

NOERROR, NXDOMAIN = "NOERROR", "NXDOMAIN"
SOA_VALUE = "ns.sandbox.invalid. hostmaster.sandbox.invalid. 1 3600 600 86400 {ttl}"
DBL_QUERIED_WITH_IP = "127.0.1.255"  # Spamhaus: an IP asked of a domain list is an error


@dataclass(frozen=True)
class Rr:
    name: str  # lower case, no final dot
    rdtype: str
    value: str  # zone-file text; for TXT the unquoted string
    ttl: int


@dataclass(frozen=True)
class Answer:
    rcode: str
    records: tuple[Rr, ...] = ()
    soa: Rr | None = None  # for NXDOMAIN and NODATA (RFC 2308 negative caching)


@dataclass(frozen=True)
class CustomerRecords:
    """What the database says about the relay: its source IPs and its customers' domains."""

    relay_hostname: str
    source_ips: Mapping[str, str | None] = field(default_factory=dict)  # address -> PTR name
    domains: Mapping[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    # domain -> [(name, type, value)] as sandbox.published.published_records reads them


def mx_addresses(behaviour: Behaviour, network: str) -> dict[str, str]:
    """Each provider's MX address: its host offset in AXIOM_SANDBOX_MX_NETWORK."""
    net = ipaddress.ip_network(network)
    return {p.name: str(net.network_address + p.host) for p in behaviour.providers}


def world_records(
    behaviour: Behaviour, addresses: Mapping[str, str], customers: CustomerRecords
) -> list[Rr]:
    ttl = behaviour.dns.ttl
    out: list[Rr] = []
    for provider in behaviour.providers:
        for domain in provider.domains:
            out += [Rr(domain, "MX", f"{pref} {host}.", ttl) for pref, host in provider.mx]
        for host in {host for _, host in provider.mx}:
            out.append(Rr(host, "A", addresses[provider.name], ttl))
    inbound = behaviour.customer_provider.mx[0][1]
    hostname = customers.relay_hostname.lower()
    for domain, records in customers.domains.items():
        out.append(Rr(domain, "MX", f"10 {inbound}.", ttl))
        out += [Rr(name.lower(), rdtype, value, ttl) for name, rdtype, value in records]
        # The relay's domain accepts DMARC reports about this one (RFC 7489 §7.1): its rua
        # names an address outside the domain, which receivers honour only with this record.
        out.append(Rr(f"{domain}._report._dmarc.{hostname}", "TXT", "v=DMARC1", ttl))
    by_name: dict[str, list[str]] = defaultdict(list)
    for address, ptr in sorted(customers.source_ips.items()):
        name = (ptr or hostname).lower()
        by_name[name].append(address)
        reverse = ipaddress.ip_address(address).reverse_pointer
        out.append(Rr(reverse, "PTR", f"{name}.", ttl))
    for name, found in by_name.items():
        for address in found:
            kind = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
            out.append(Rr(name, kind, address, ttl))
    if customers.source_ips:
        mechanisms = " ".join(
            f"ip{ipaddress.ip_address(a).version}:{a}" for a in sorted(customers.source_ips)
        )
        out.append(Rr(f"_spf.{hostname}", "TXT", f"v=spf1 {mechanisms} -all", ttl))
        # The relay's own name is its bounce domain by default (the return path of mail whose
        # customer has no return-path subdomain published, relay/delivery/return_path.py)
        # and its HELO name: SPF passes for it from the relay's IPs.
        out.append(Rr(hostname, "TXT", f"v=spf1 include:_spf.{hostname} -all", ttl))
    return out


class Zone:
    """Everything the sandbox DNS answers, at one moment."""

    def __init__(
        self,
        behaviour: Behaviour,
        records: Iterable[Rr],
        overrides: Iterable[Override] = (),
        listings: Iterable[Listing] = (),
    ):
        self.behaviour = behaviour
        self._records: dict[tuple[str, str], list[Rr]] = defaultdict(list)
        for rr in records:
            self._records[(rr.name, rr.rdtype)].append(rr)
        for o in overrides:
            self._records[(o.name, o.rdtype)] = [
                Rr(o.name, o.rdtype, v, behaviour.dns.ttl) for v in o.values
            ]
        self._names: set[str] = set()
        for (name, _), rrs in self._records.items():
            if rrs:
                labels = name.split(".")
                self._names.update(".".join(labels[i:]) for i in range(len(labels) - 1))
        self._dnsbl = {z.zone: z for z in behaviour.dnsbl}
        self._listed: dict[tuple[str, str], Listing] = {(x.zone, x.subject): x for x in listings}
        # The DNS server's answers on the wire (sandbox/dns.py), per query less its ID: a zone
        # never changes (the world builds a new one), so an answer made once stays true.
        self.wire_answers: dict[tuple[bytes, int | None], bytes] = {}

    def answer(self, qname: str, rdtype: str) -> Answer:
        name = qname.lower().rstrip(".")
        zone = self._dnsbl_zone(name)
        if zone is not None:
            return self._dnsbl_answer(zone, name, rdtype)
        if rdtype == "ANY":
            found = tuple(rr for (n, _), rrs in self._records.items() if n == name for rr in rrs)
        else:
            found = tuple(self._records.get((name, rdtype), ()))
        if found:
            return Answer(NOERROR, found)
        if name in self._names:
            return Answer(NOERROR, soa=self._soa(name))
        return Answer(NXDOMAIN, soa=self._soa(name))

    # --- blocklists ---
    def _dnsbl_zone(self, name: str) -> DnsblZone | None:
        for zone_name, zone in self._dnsbl.items():
            if name == zone_name or name.endswith("." + zone_name):
                return zone
        return None

    def _dnsbl_answer(self, zone: DnsblZone, name: str, rdtype: str) -> Answer:
        soa = Rr(zone.zone, "SOA", SOA_VALUE.format(ttl=self._negative()), self._negative())
        if name == zone.zone:
            if rdtype == "SOA":
                return Answer(NOERROR, (soa,))
            return Answer(NOERROR, soa=soa)
        prefix = name[: -len(zone.zone) - 1]
        hit = self.listing_for(zone, prefix)
        if hit is None:
            return Answer(NXDOMAIN, soa=soa)
        code, text = hit
        ttl = self.behaviour.dns.dnsbl_ttl
        if rdtype == "A":
            return Answer(NOERROR, (Rr(name, "A", code, ttl),))
        if rdtype == "TXT" and text:
            return Answer(NOERROR, (Rr(name, "TXT", text, ttl),))
        return Answer(NOERROR, soa=soa)

    def listing_for(self, zone: DnsblZone, prefix: str) -> tuple[str, str] | None:
        """(return code, TXT reason) when the query prefix is listed in zone, else None."""
        source = self._dnsbl[zone.part_of] if zone.part_of else zone
        if zone.kind == "ip":
            subject = _reversed_ip(prefix)
            if subject is None:
                return None
            candidates = [subject]
            test_listed, test_clear = (
                subject == "127.0.0.2" or subject == "::ffff:7f00:2",
                subject in ("127.0.0.1", "::ffff:7f00:1"),
            )
        else:
            if _reversed_ip(prefix) is not None:
                return DBL_QUERIED_WITH_IP, ""
            labels = prefix.split(".")
            # Domain lists are wildcarded: a listed domain covers every name below it.
            candidates = [".".join(labels[i:]) for i in range(len(labels))]
            test_listed, test_clear = prefix == "test", prefix == "invalid"
        # An explicit listing wins even over the test points: on loopback 127.0.0.1 is a real
        # source address, and the sandbox must be able to list it.
        for subject in candidates:
            listing = self._listed.get((source.zone, subject))
            if listing is not None:
                return self._shaped(zone, source, listing.code, subject)
        if test_listed and not test_clear:
            code = source.default_code or next(iter(source.codes))
            return self._shaped(zone, source, code, candidates[0])
        return None

    def _shaped(
        self, zone: DnsblZone, source: DnsblZone, code: str, subject: str
    ) -> tuple[str, str] | None:
        if zone.part_of and code not in zone.part_codes:
            return None
        meaning = source.codes.get(code, "listed")
        return code, source.txt.format(meaning=meaning, subject=subject)

    def _soa(self, name: str) -> Rr:
        # The apex the negative answer names: the organisational domain (Public Suffix List),
        # as a registered zone would be; reverse names all answer from in-addr.arpa / ip6.arpa.
        if name.endswith(".in-addr.arpa") or name.endswith(".ip6.arpa"):
            apex = ".".join(name.split(".")[-2:])
        else:
            apex = organisational_domain(name)
        ttl = self._negative()
        return Rr(apex, "SOA", SOA_VALUE.format(ttl=ttl), ttl)

    def _negative(self) -> int:
        return self.behaviour.dns.negative_ttl


def _reversed_ip(prefix: str) -> str | None:
    """The address a DNSBL query names: 4 reversed octets, or 32 reversed IPv6 nibbles."""
    labels = prefix.split(".")
    try:
        if len(labels) == 4:
            return str(ipaddress.IPv4Address(".".join(reversed(labels))))
        if len(labels) == 32 and all(len(x) == 1 for x in labels):
            nibbles = "".join(reversed(labels))
            return str(ipaddress.IPv6Address(int(nibbles, 16)))
    except ValueError:
        return None
    return None


def dnsbl_query_name(subject: str, zone: str) -> str:
    """The name to ask a blocklist about an IP (reversed) or a domain (as is)."""
    try:
        address = ipaddress.ip_address(subject)
    except ValueError:
        return f"{subject.lower().rstrip('.')}.{zone}"
    if address.version == 4:
        return ".".join(reversed(str(address).split("."))) + f".{zone}"
    return ".".join(reversed(address.exploded.replace(":", ""))) + f".{zone}"
