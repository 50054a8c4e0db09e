"""An authoritative DNS server on loopback (UDP and TCP) answering from a sandbox `Zone`.

dnspython parses and builds the messages; this module only moves them. A UDP answer too big
for the client's buffer (512 octets, or its EDNS size) goes out truncated with TC set, and
the client repeats the question over TCP (RFC 7766), where DKIM keys always fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from sandbox.zones import NXDOMAIN, Answer, Rr, Zone

log = logging.getLogger("axiom.sandbox.dns")
TCP_IDLE_SECONDS = 10.0
MAX_TCP_QUERIES = 100  # per connection; a resolver asks a few and closes


WIRE_ANSWERS_PER_ZONE = 10_000  # bounded: a zone lives until the world's next change


def respond(wire: bytes, zone: Zone, max_size: int | None) -> bytes | None:
    """The wire answer to one query, or None for input that is not a DNS query at all.

    An answer is kept with the zone and reused for the same query (same bytes after the ID:
    name, type, flags, EDNS size), given the asking query's ID: building and encoding it
    with dnspython was most of the server's time, paid again for every message the simulated
    receivers check (they keep answers only while the same zone is served: sandbox/lookup.py)."""
    if len(wire) < 12:
        return _respond(wire, zone, max_size)
    key = (wire[2:], max_size)
    known = zone.wire_answers.get(key)
    if known is not None:
        return wire[:2] + known[2:]
    answer = _respond(wire, zone, max_size)
    if answer is not None and len(zone.wire_answers) < WIRE_ANSWERS_PER_ZONE:
        zone.wire_answers[key] = answer
    return answer


def _respond(wire: bytes, zone: Zone, max_size: int | None) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR:
        return None  # a response, not a question: never answer it (no reflection loops)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    response.flags &= ~dns.flags.RA
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
    else:
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
        else:
            _fill(
                response,
                question.name,
                zone.answer(question.name.to_text(), dns.rdatatype.to_text(question.rdtype)),
            )
    limit = max_size
    if limit is not None:
        payload = query.payload if query.edns >= 0 else 512
        limit = max(512, min(payload, max_size))
    try:
        return response.to_wire(max_size=limit or 65535)
    except dns.exception.TooBig:
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire()


def _fill(response: dns.message.Message, qname: dns.name.Name, answer: Answer) -> None:
    if answer.rcode == NXDOMAIN:
        response.set_rcode(dns.rcode.NXDOMAIN)
    for rr in answer.records:
        _add(response.answer, qname, rr)
    if answer.soa is not None:
        _add(response.authority, dns.name.from_text(answer.soa.name), answer.soa)


def _add(section: list, owner: dns.name.Name, rr: Rr) -> None:
    rdtype = dns.rdatatype.from_text(rr.rdtype)
    text = _txt(rr.value) if rr.rdtype == "TXT" else rr.value
    rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)
    for rrset in section:
        if rrset.name == owner and rrset.rdtype == rdtype:
            rrset.add(rdata, rr.ttl)
            return
    rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, rdtype)
    rrset.add(rdata, rr.ttl)
    section.append(rrset)


def _txt(value: str) -> str:
    """A TXT value as zone-file strings of at most 255 octets each (RFC 1035 3.3.14)."""
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(
        '"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks
    )


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: Callable[[], Zone]):
        self._zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            wire = respond(data, self._zone(), max_size=4096)
        except Exception:
            log.exception("DNS query from %s failed", addr)
            return
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


class DnsServer:
    """Serves `zone()` (called per query, so a new Zone takes effect at once)."""

    def __init__(self, host: str, port: int, zone: Callable[[], Zone]):
        self.host, self.port = host, port
        self._zone = zone
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self._zone), local_addr=(self.host, self.port)
        )
        if self.port == 0:
            self.port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            for _ in range(MAX_TCP_QUERIES):
                async with asyncio.timeout(TCP_IDLE_SECONDS):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    wire = respond(await reader.readexactly(length), self._zone(), None)
                if wire is None:
                    break
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
