"""A real authoritative DNS server (Knot) on loopback, serving zones written in Python.

    with KnotServer({"example.test": [("@", "MX", "10 mx1"), ("mx1", "A", "127.0.0.2")]}) as ns:
        settings = load_settings(dns_nameservers=ns.nameserver)

Records are (owner, type, data) or (owner, type, data, ttl) in zone-file syntax, owners relative
to the zone ("@" is the apex) unless they end in a dot. Every zone gets an SOA (its minimum is the
negative-caching TTL) and an NS. Failures the relay must meet are made for real:

- `servfail(zone)`: Knot serves the zone from a file that does not parse, so it answers SERVFAIL
  for every name in it (a configured zone that failed to load is answered SERVFAIL);
- `stop()`: nobody listens any more, queries are refused by the kernel;
- `SilentNameserver`: a bound port that reads nothing and answers nothing, so clients time out.

Each server has its own directory, port and control socket, so several run side by side, and
every process is ended by `stop()`, the context manager or, at the latest, interpreter exit.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from testbed.ports import pick

Record = tuple[str, str, str] | tuple[str, str, str, int]
Zones = Mapping[str, Sequence[Record]]

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KNOTC = shutil.which("knotc") or "/usr/sbin/knotc"
_BROKEN_ZONE = "; served broken on purpose: Knot answers SERVFAIL for this zone\n@ SOA broken\n"


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host, not handed out before (testbed/ports.py)."""
    return pick(host, udp=True)


def _absolute(zone: str) -> str:
    return zone.strip().rstrip(".").lower() + "."


def _txt_data(data: str) -> str:
    """Quote a bare TXT value, split into the 255-octet strings a TXT record is made of."""
    if data.lstrip().startswith('"'):
        return data
    raw = data.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(
        '"' + c.decode(errors="replace").replace("\\", "\\\\").replace('"', '\\"') + '"'
        for c in chunks
    )


def ptr_zones(names: Mapping[str, str]) -> dict[str, list[Record]]:
    """Reverse zones for IPv4 addresses: {"127.0.0.10": "mail.example.test"} becomes the zone
    0.0.127.in-addr.arpa with `10 PTR mail.example.test.`."""
    zones: dict[str, list[Record]] = {}
    for address, name in names.items():
        ip = ipaddress.IPv4Address(address)
        octets = str(ip).split(".")
        zone = ".".join(reversed(octets[:3])) + ".in-addr.arpa"
        zones.setdefault(zone, []).append((octets[3], "PTR", name.rstrip(".") + "."))
    return zones


def merge_zones(*parts: Zones) -> dict[str, list[Record]]:
    merged: dict[str, list[Record]] = {}
    for part in parts:
        for zone, records in part.items():
            merged.setdefault(_absolute(zone), []).extend(records)
    return merged


def _terminate(proc: subprocess.Popen, directory: Path) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


class KnotServer:
    """knotd on host:port serving the given zones; start() it or use it as a context manager."""

    def __init__(
        self,
        zones: Zones | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        servfail: Iterable[str] = (),
        default_ttl: int = 60,
        negative_ttl: int = 30,
    ):
        self.host = host
        self.port = port or free_udp_tcp_port(host)
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self._zones: dict[str, list[Record]] = merge_zones(zones or {})
        self._broken: set[str] = {_absolute(z) for z in servfail}
        self._serials: dict[str, int] = {}
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # --- addresses ---
    @property
    def nameserver(self) -> str:
        """As AXIOM_DNS_NAMESERVERS takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def log(self) -> str:
        path = self._dir / "knotd.log" if self._dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    # --- lifecycle ---
    def start(self, timeout: float = 15) -> KnotServer:
        if self._proc is not None:
            raise RuntimeError("already started")
        self._dir = Path(tempfile.mkdtemp(prefix="axiom-knot-"))
        (self._dir / "db").mkdir()
        for zone in self._zones:
            self._write_zone(zone)
        self._write_config()
        logf = open(self._dir / "knotd.log", "wb")  # noqa: SIM115 (the child writes to it)
        try:
            self._proc = subprocess.Popen(
                [KNOTD, "-c", str(self._dir / "knot.conf")],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            logf.close()
        self._finalizer = weakref.finalize(self, _terminate, self._proc, self._dir)
        try:
            self._wait_listening(timeout)
            for zone in self._zones:
                self._wait_zone(zone, timeout)
            for zone in self._broken:
                self._wait_rcode(zone, dns.rcode.SERVFAIL, timeout)
        except BaseException:
            log = self.log
            self.stop()
            raise RuntimeError(f"knotd on {self.nameserver} did not come up:\n{log}") from None
        return self

    def stop(self) -> None:
        """End knotd and remove its directory; the port then refuses queries."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc = None
        self._finalizer = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> KnotServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- changing what is served ---
    def set_zone(self, zone: str, records: Sequence[Record], timeout: float = 15) -> None:
        """Add or replace a zone and wait until knotd serves the new version."""
        zone = _absolute(zone)
        known = zone in self._zones
        was_broken = zone in self._broken
        self._zones[zone] = list(records)
        self._broken.discard(zone)
        if not self.running:
            return
        if was_broken:  # a zone that failed to load is reloaded from its new file by a fresh add
            self._remove_from_server(zone, timeout)
            known = False
        self._write_zone(zone)
        if known:
            self._knotc("zone-reload", zone)
        else:
            self._write_config()
            self._knotc("reload")
        self._wait_zone(zone, timeout)

    def remove_zone(self, zone: str, timeout: float = 15) -> None:
        """Stop serving a zone: its names are then answered by a parent zone, or REFUSED."""
        zone = _absolute(zone)
        if self.running and (zone in self._zones or zone in self._broken):
            self._remove_from_server(zone, timeout)
        self._zones.pop(zone, None)
        self._broken.discard(zone)

    def servfail(self, zone: str, timeout: float = 15) -> None:
        """From now on every name in zone is answered SERVFAIL. To fail one name inside a served
        zone, pass that name: the most specific zone answers, and that one is broken."""
        zone = _absolute(zone)
        if not self.running:
            self._zones.pop(zone, None)
            self._broken.add(zone)
            return
        if zone in self._broken:
            return
        # A loaded zone keeps its last good version when a reload fails, so take it out first.
        if zone in self._zones:
            self._remove_from_server(zone, timeout)
            self._zones.pop(zone)
        self._broken.add(zone)
        self._write_config()
        self._knotc("reload")
        self._wait_rcode(zone, dns.rcode.SERVFAIL, timeout)

    def serial(self, zone: str) -> int:
        return self._serials[_absolute(zone)]

    # --- internals ---
    def _remove_from_server(self, zone: str, timeout: float) -> None:
        self._broken.discard(zone)
        saved = self._zones.pop(zone, None)
        self._write_config()
        self._knotc("reload")
        self._wait_gone(zone, timeout)
        if saved is not None:
            self._zones[zone] = saved

    def _zone_file(self, zone: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{zone.rstrip('.') or 'root'}.zone"

    def _write_zone(self, zone: str) -> None:
        serial = self._serials.get(zone, 0) + 1
        self._serials[zone] = serial
        lines = [
            f"$ORIGIN {zone}",
            f"$TTL {self.default_ttl}",
            f"@ {self.negative_ttl} SOA ns.{zone} hostmaster.{zone} {serial} 3600 600 86400 "
            f"{self.negative_ttl}",
            "@ 3600 NS ns.axiom-peer.invalid.",
        ]
        for record in self._zones[zone]:
            owner, rtype, data = record[0], record[1].upper(), record[2]
            ttl = record[3] if len(record) > 3 else self.default_ttl
            if rtype == "TXT":
                data = _txt_data(data)
            lines.append(f"{owner} {ttl} IN {rtype} {data}")
        self._zone_file(zone).write_text("\n".join(lines) + "\n")

    def _write_config(self) -> None:
        assert self._dir is not None
        listen = f"{self.host}@{self.port}"
        zones = []
        for zone in sorted(self._zones):
            zones.append(f'  - domain: "{zone}"\n    file: "{self._zone_file(zone)}"')
        for zone in sorted(self._broken):
            broken = self._dir / f"{zone.rstrip('.')}.broken.zone"
            broken.write_text(f"$ORIGIN {zone}\n{_BROKEN_ZONE}")
            zones.append(f'  - domain: "{zone}"\n    file: "{broken}"')
        text = f"""\
server:
    rundir: "{self._dir}"
    listen: {listen}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: info
database:
    storage: "{self._dir / "db"}"
template:
  - id: default
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: off
"""
        if zones:
            text += "zone:\n" + "\n".join(zones) + "\n"
        (self._dir / "knot.conf").write_text(text)

    def _knotc(self, *args: str) -> None:
        assert self._dir is not None
        conf, sock = str(self._dir / "knot.conf"), str(self._dir / "knot.sock")
        result = subprocess.run(
            [KNOTC, "-c", conf, "-s", sock, "-b", "-t", "15", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"knotc {' '.join(args)} failed: {result.stdout}{result.stderr}")

    def _query(self, name: str, rdtype: str = "SOA") -> dns.message.Message | None:
        query = dns.message.make_query(name, rdtype)
        try:
            return dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        except (dns.exception.DNSException, OSError):
            return None

    def _until(self, check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"knotd exited while waiting for {what}")
            if check():
                return
            time.sleep(0.02)
        raise TimeoutError(f"knotd on {self.nameserver}: {what} not seen in {timeout}s")

    def _wait_listening(self, timeout: float) -> None:
        def answers_udp_and_tcp() -> bool:
            try:  # TCP first: a closed port refuses at once, where UDP would wait for a timeout
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                return False
            return self._query("probe.axiom-peer.invalid.") is not None

        self._until(answers_udp_and_tcp, "listening", timeout)

    def _wait_zone(self, zone: str, timeout: float) -> None:
        serial = self._serials[zone]

        def serves() -> bool:
            response = self._query(zone)
            return (
                response is not None
                and response.rcode() == dns.rcode.NOERROR
                and any(
                    rrset.rdtype == dns.rdatatype.SOA and rrset[0].serial == serial
                    for rrset in response.answer
                )
            )

        self._until(serves, f"{zone} serial {serial}", timeout)

    def _wait_gone(self, zone: str, timeout: float) -> None:
        """Neither served nor failing: a parent zone answers for it, or nobody (REFUSED)."""

        def gone() -> bool:
            response = self._query(zone)
            return (
                response is not None
                and response.rcode() != dns.rcode.SERVFAIL
                and not any(
                    rrset.rdtype == dns.rdatatype.SOA and rrset.name.to_text() == zone
                    for rrset in response.answer
                )
            )

        self._until(gone, f"{zone} no longer served", timeout)

    def _wait_rcode(self, zone: str, rcode: int, timeout: float) -> None:
        def answered() -> bool:
            response = self._query(zone)
            return response is not None and response.rcode() == rcode

        self._until(answered, f"{zone} answered {dns.rcode.to_text(rcode)}", timeout)


class SilentNameserver:
    """A UDP and TCP port on loopback that accepts queries and never answers: a timeout."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_udp_tcp_port(host)
        self._sockets: list[socket.socket] = []

    @property
    def nameserver(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> SilentNameserver:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        self._sockets = [udp, tcp]
        udp.bind((self.host, self.port))
        tcp.bind((self.host, self.port))
        tcp.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
        return self

    def stop(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def __enter__(self) -> SilentNameserver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def knot() -> Iterator:
    """A factory: knot(zones, **options) starts a KnotServer stopped when the test ends."""
    servers: list[KnotServer] = []

    def start(zones: Zones | None = None, **options) -> KnotServer:
        server = KnotServer(zones, **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def silent_nameserver() -> Iterator[SilentNameserver]:
    with SilentNameserver() as server:
        yield server
