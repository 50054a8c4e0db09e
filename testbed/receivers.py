"""A receiving world on loopback: Knot DNS for the receiving domains and one smtp-sink per
domain, each at its own loopback address, all on one port (AXIOM_DELIVERY_PORT, as port 25 is
one port in production). Every sink captures what it accepts, and `copies()` counts what the
receivers stored per (X-Test-Seq marker, recipient): the ground truth of the fault matrix.

    with Receivers({"gmail.com": ("gmail-smtp-in.l.google.com", "127.0.80.1")}) as world:
        world.start({"gmail.com": ["-Q", "MAIL"]})  # smtp-sink options per domain
        relay_env = world.env  # AXIOM_DNS_NAMESERVERS, AXIOM_DELIVERY_PORT
        world.stop_dns(); world.start_dns()  # an outage of the only nameserver
        world.sink("gmail.com")  # the receiver comes back healthy
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from testbed.dns import KnotServer, merge_zones
from testbed.postfix import SmtpSink, free_port
from testbed.submitters import SEQ_HEADER


class Receivers:
    """receivers: domain -> (MX host name, loopback address of its receiver)."""

    def __init__(self, receivers: dict[str, tuple[str, str]]):
        self.receivers = dict(receivers)
        first = next(iter(self.receivers.values()))[1]
        self.port = free_port(first)
        self.knot: KnotServer | None = None
        self.dns_port: int | None = None
        self.sinks: dict[str, SmtpSink] = {}
        self._retired: list[Path] = []  # what replaced sinks had received

    @property
    def domains(self) -> list[str]:
        return list(self.receivers)

    def zones(self) -> dict:
        zones: dict[str, list] = {}
        for domain, (mx_host, address) in self.receivers.items():
            zones.setdefault(domain, []).append(("@", "MX", f"10 {mx_host}."))
            mx_zone = ".".join(mx_host.split(".")[-2:])
            zones.setdefault(mx_zone, []).append((f"{mx_host}.", "A", address))
        return merge_zones(zones)

    def start(self, options: dict[str, Sequence[str]] | None = None) -> Receivers:
        self.start_dns()
        for domain in self.receivers:
            self.sink(domain, (options or {}).get(domain, ()))
        return self

    def start_dns(self) -> None:
        """Start Knot, on the port it had before if it ran already."""
        self.knot = KnotServer(self.zones(), port=self.dns_port).start()
        self.dns_port = self.knot.port

    def stop_dns(self) -> None:
        if self.knot is not None:
            self.knot.stop()

    def sink(self, domain: str, options: Sequence[str] = ()) -> SmtpSink:
        """(Re)start domain's receiver with smtp-sink options; what the old one got is kept."""
        old = self.sinks.pop(domain, None)
        if old is not None:
            keep = Path(tempfile.mkdtemp(prefix="axiom-sink-kept-"))
            if old.dump_dir is not None:
                shutil.copytree(old.dump_dir, keep, dirs_exist_ok=True)
            self._retired.append(keep)
            old.stop()
        _, address = self.receivers[domain]
        sink = SmtpSink(list(options), host=address, port=self.port, capture=True).start()
        self.sinks[domain] = sink
        return sink

    def address_of(self, domain: str) -> tuple[str, int]:
        """Where domain's receiver listens."""
        return self.receivers[domain][1], self.port

    @property
    def env(self) -> dict[str, str]:
        return {
            "AXIOM_DNS_NAMESERVERS": f"127.0.0.1:{self.dns_port}",
            "AXIOM_DELIVERY_PORT": str(self.port),
        }

    def copies(self, domains: Iterable[str] | None = None) -> Counter:
        """(X-Test-Seq, recipient) -> how many copies the receivers stored (all of them, or
        the current receivers of domains)."""
        wanted = set(domains) if domains is not None else set(self.receivers)
        dirs = [s.dump_dir for d, s in self.sinks.items() if d in wanted and s.dump_dir]
        if domains is None:
            dirs += self._retired
        found: Counter = Counter()
        for directory in dirs:
            for path in Path(directory).rglob("*"):
                if path.is_file():
                    seq, rcpts = parse_dump(path.read_bytes())
                    for rcpt in rcpts:
                        found[(seq, rcpt)] += 1
        return found

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.sinks.clear()
        self.stop_dns()
        for directory in self._retired:
            shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> Receivers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_dump(data: bytes) -> tuple[str | None, list[str]]:
    """An smtp-sink dump: its X-Rcpt-Args lines, then the message with our X-Test-Seq."""
    head = data.split(b"\nReceived:", 1)[0]
    rcpts = [
        line.split(b": ", 1)[1].split()[0].strip(b"<>").decode()
        for line in head.splitlines()
        if line.startswith(b"X-Rcpt-Args: ")
    ]
    match = SEQ_HEADER.search(data)
    return (match.group(1).decode() if match else None), rcpts
