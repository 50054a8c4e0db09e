"""What the delivery benchmarks (end_to_end, memory, soak) share: progress output, a relay
with delivery on, a receiving world on loopback (Knot MX records → smtp-sink), the sink's
message counter, resident memory of a process tree and the machine's load split into ours and
everybody else's.

The receiving world follows tests/integration/delivery_world.py: each receiver at its own
loopback address, all on one port (AXIOM_DELIVERY_PORT, as port 25 is one port in
production), and Knot serving the MX and A records the relay resolves through
AXIOM_DNS_NAMESERVERS.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from sqlalchemy import create_engine, text

from bench.setups import AxiomRelay, group_cpu_seconds, machine_busy
from testbed.dns import KnotServer, merge_zones
from testbed.postfix import SmtpSink, free_port

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"
DOMAIN = "bench.test"
SENDER = f"bench@{DOMAIN}"
SIZE = 2048
SESSIONS = 20

console = Console(width=None if sys.stdout.isatty() else 150)
# bench/__main__.py sets it, so every part's clock counts from the start of `make bench`
_started = float(os.environ.get("BENCH_STARTED_AT") or time.time())


def say(text: str) -> None:
    console.print(f"[dim]{time.time() - _started:6.1f}s[/dim] {text}", highlight=False)


def machine_info(**extra: object) -> dict:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **extra,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    say(f"results written to {shown}")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# ---------------------------------------------------------------- load on the machine
@dataclass
class LoadSample:
    """Share of all cores busy over an interval (0..1): the whole machine, the processes of
    this benchmark (systems under test, peers, load generator), and everybody else."""

    machine: float
    ours: float
    others: float

    def text(self) -> str:
        return (
            f"machine {100 * self.machine:.0f}% busy, of which other work "
            f"{100 * self.others:.0f}% of all cores"
        )


class LoadMeter:
    """Measures the load between two calls of sample(). `pgids` names the process groups that
    belong to this benchmark; the rest of the busy time is other engineers' work."""

    def __init__(self, pgids: Callable[[], Iterable[int]]):
        self._pgids = pgids
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        busy, total = machine_busy()
        ours = group_cpu_seconds(self._pgids()) + _own_cpu_seconds()
        return busy, total, ours

    def sample(self) -> LoadSample:
        busy0, total0, ours0 = self._last
        self._last = busy1, total1, ours1 = self._read()
        if total1 <= total0:
            return LoadSample(0.0, 0.0, 0.0)
        machine = (busy1 - busy0) / (total1 - total0)
        seconds_of_all_cores = (total1 - total0) / os.sysconf("SC_CLK_TCK")
        # group membership changes (a reaped process takes its time away from the sum), so
        # "ours" is clamped to what the machine did
        ours = min(machine, max(0.0, (ours1 - ours0) / seconds_of_all_cores))
        return LoadSample(machine, ours, machine - ours)


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ---------------------------------------------------------------- resident memory
def process_tree(pid: int) -> list[int]:
    """pid and all of its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class RssSample:
    """Resident memory in MB (10^6 bytes, as "300 MB" in issue 5 means)."""

    at: float  # seconds since the measurement started
    total_mb: float  # the sum over the process tree
    per_process_mb: dict[int, float] = field(default_factory=dict)

    @property
    def largest_mb(self) -> float:
        return max(self.per_process_mb.values(), default=0.0)


def sample_rss(pid: int, started: float) -> RssSample:
    per = {p: rss_kib(p) * 1024 / 1e6 for p in process_tree(pid)}
    per = {p: v for p, v in per.items() if v}
    return RssSample(time.monotonic() - started, sum(per.values()), per)


def slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return 60 * cov / var


# ---------------------------------------------------------------- the receiving world
class CountingSink(SmtpSink):
    """smtp-sink with running counters (-c): it rewrites "sess=N quit=N mesg=N" after every
    session end, QUIT and end of DATA, so delivered() is the number of messages it accepted,
    read from its output without dumping each message to a file."""

    def __init__(self, options: Sequence[str] = (), **kwargs):
        super().__init__(["-c", *options], **kwargs)

    def delivered(self) -> int:
        path = self.root / "smtp-sink.out"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                tail = f.read()
        except FileNotFoundError:
            return 0
        for record in reversed(tail.replace(b"\n", b"\r").split(b"\r")):
            for item in record.split():
                if item.startswith(b"mesg="):
                    with contextlib.suppress(ValueError):
                        return int(item[5:])
        return 0

    def wait_for(self, count: int, timeout: float, poll: float = 0.05) -> float | None:
        """Monotonic time at which the sink had accepted `count` messages; None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.delivered() >= count:
                return time.monotonic()
            time.sleep(poll)
        return None


@dataclass
class Receiver:
    domain: str  # the recipients' domain
    mx_host: str  # its MX host name (a provider's suffix picks the shaping, runbooks/)
    address: str  # loopback address the MX resolves to
    options: Sequence[str] = ()  # smtp-sink options; None below: nobody listens
    listening: bool = True


class ReceivingWorld:
    """Knot serving MX + A for each receiver's domain, and an smtp-sink with counters at each
    listening receiver's address, all on one port."""

    def __init__(self, receivers: Sequence[Receiver]):
        self.receivers = list(receivers)
        self.port = free_port(self.receivers[0].address)
        self.knot: KnotServer | None = None
        self.sinks: dict[str, CountingSink] = {}

    def zones(self) -> dict:
        zones: dict[str, list] = {}
        for r in self.receivers:
            zones.setdefault(r.domain, []).append(("@", "MX", f"10 {r.mx_host}."))
            mx_zone = ".".join(r.mx_host.split(".")[-2:])
            zones.setdefault(mx_zone, []).append((f"{r.mx_host}.", "A", r.address))
        return merge_zones(zones)

    def start(self) -> ReceivingWorld:
        self.knot = KnotServer(self.zones()).start()
        for r in self.receivers:
            if r.listening:
                self.sinks[r.domain] = CountingSink(
                    r.options, host=r.address, port=self.port, backlog=1024
                ).start()
        return self

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.sinks.clear()
        if self.knot is not None:
            self.knot.stop()
            self.knot = None

    @property
    def env(self) -> dict[str, str]:
        assert self.knot is not None
        return {
            "AXIOM_DNS_NAMESERVERS": self.knot.nameserver,
            "AXIOM_DELIVERY_PORT": str(self.port),
        }

    def pgids(self) -> list[int]:
        groups = [s._proc.pid for s in self.sinks.values() if s._proc is not None]
        if self.knot is not None and self.knot._proc is not None:
            groups.append(self.knot._proc.pid)
        return groups


# ---------------------------------------------------------------- Axiom with delivery on
class DeliveringRelay(AxiomRelay):
    """bench.setups.AxiomRelay (fresh AXIOM_HOME provisioned through the CLI, network-bound
    tenant) with its delivery engine on, pointed at a receiving world by settings only."""

    def __init__(self, processes: int, extra_env: dict[str, str], **kwargs):
        super().__init__(processes, **kwargs)
        self.extra_env = dict(extra_env)

    @property
    def env(self) -> dict[str, str]:
        return super().env | {"AXIOM_DELIVERY_ENABLED": "true"} | self.extra_env

    @property
    def db_url(self) -> str:
        return self.extra_env.get("AXIOM_DATABASE_URL") or f"sqlite:///{self.home / 'axiom.db'}"


class SpoolProbe:
    """Read-only questions about a relay's spool while it runs (SQLite WAL readers do not
    block the writer)."""

    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            path = url.removeprefix("sqlite:///")
            self.engine = create_engine(
                f"sqlite:///file:{path}?mode=ro&uri=true", connect_args={"timeout": 30}
            )
        else:
            self.engine = create_engine(
                url.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=1
            )

    def states(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM recipient GROUP BY state"))
            return {str(state): int(n) for state, n in rows}

    def attempts(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM deliveryevent")).scalar_one())

    def tenant_id(self, name: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT id FROM tenant WHERE name = :n"), {"n": name}
                ).scalar_one()
            )

    def close(self) -> None:
        self.engine.dispose()
