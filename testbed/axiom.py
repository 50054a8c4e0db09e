"""Axiom's own processes as peers: a home to run them in, and one wrapper that starts any axiom
command with its environment, waits until it says it is ready, and stops it.

    home = make_home(tmp / "home", "sqlite:///…/axiom.db")       # what `axiom init` leaves
    relay = RelayProcess(home, {"AXIOM_DELIVERY_ENABLED": "false"}).start()
    relay.kill9(); relay.start()                                  # a crash and a restart
    assert relay.stop() == 0                                      # SIGTERM: a clean exit

Every process runs in its own session (process group), writes stdout and stderr to a log file
in its home, and is stopped with SIGTERM, then SIGKILL of its whole group if it does not exit
in time, so a test or benchmark leaves no listener behind. Tests (tests/conftest.py), the
fault matrix (testbed/faults.py) and the benchmarks (bench/) all start axiom through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.postfix import free_port
from testbed.schema import migrate_new

VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- the home
@dataclass
class AxiomHome:
    """An initialised AXIOM_HOME with its own database and free ports on `host`."""

    path: Path
    db_url: str
    secret: bytes
    ports: dict[str, int] = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def inbound_listen(self) -> str:
        """Each home's relay its own inbound listener (relay/inbound), so relays run side by
        side; allocated on first use for homes built with the three submission ports."""
        if "inbound" not in self.ports:
            self.ports["inbound"] = free_port(self.host)
        return f"{self.host}:{self.ports['inbound']}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXIOM_")}
        env.update(
            AXIOM_HOME=str(self.path),
            AXIOM_DATABASE_URL=self.db_url,
            AXIOM_SUBMISSION_LISTEN=f"{self.host}:{self.ports['submission']}",
            AXIOM_SUBMISSION_TLS_LISTEN=f"{self.host}:{self.ports['submission_tls']}",
            AXIOM_HTTP_LISTEN=f"{self.host}:{self.ports['http']}",
            AXIOM_INBOUND_LISTEN=self.inbound_listen,
            AXIOM_CONFIG=str(self.path / "axiom.toml"),
            PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        )
        return env

    def cli(self, *args: str, check: bool = True, input: str | None = None, extra_env=None):
        from testbed import cli

        result = cli.run(args, self.env | (extra_env or {}), input=input, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(
                f"axiom {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    @property
    def keybox(self):
        from relay.submission.keystore import KeyBox

        return KeyBox(self.secret)


def make_home(
    path: Path,
    db_url: str,
    *,
    extra_ips: Sequence[str] = (),
    secret: bytes | None = None,
    host: str = "127.0.0.1",
    hostname: str = "relay.axiom.test",
    database: bool = True,
) -> AxiomHome:
    """What `axiom init` leaves behind, written directly (faster than the CLI): secret key,
    TLS pair, migrated database, default pool (127.0.0.1, plus extra_ips, active); and free
    ports on `host` for the listeners. Homes that share a database share its secret; with
    database=False the database is left as it is (another node's home set it up)."""
    from sqlalchemy import select

    from config.tls import write_self_signed
    from models import IpAddress, IpPool, IpState
    from models.db import make_engine, session_scope
    from protocol.egress import ensure_default_pool
    from relay.submission.keystore import KeyBox

    path.mkdir(parents=True, exist_ok=True)
    secret = secret if secret is not None else KeyBox.generate()
    (path / "secret.key").write_bytes(secret)
    write_self_signed(path / "tls" / "cert.pem", path / "tls" / "key.pem", hostname)
    if database:
        migrate_new(db_url)
        engine = make_engine(db_url)
        try:
            with session_scope(engine) as s:
                ensure_default_pool(s)
                pool = s.exec(select(IpPool).where(IpPool.name == "default")).scalars().one()
                for address in extra_ips:
                    s.add(IpAddress(address=address, pool_id=pool.id, state=IpState.active))
                s.commit()
        finally:
            engine.dispose()
    ports = {name: free_port(host) for name in ("submission", "submission_tls", "http")}
    return AxiomHome(path, db_url, secret, ports, host)


@dataclass
class Tenant:
    name: str
    domain: str
    username: str
    password: str


def fast_password_hash(password: str) -> str:
    """An argon2id hash with the algorithm's smallest cost (1 pass over 1 MiB, one lane).

    A hash carries its own parameters and the relay verifies with them, so a credential made
    with it is checked by the relay's own code like any other. The product's profile costs
    0.19 s of CPU per hash here, paid for every tenant the tests seed (Django's test settings
    make the same trade with a fast hasher); `axiom credential add` and
    tests/unit/test_tenant_contact.py still go through the product's own hashing."""
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


def seed_tenant(
    home: AxiomHome, name: str, domain: str, *, activate: bool = True, network: str | None = None
) -> Tenant:
    """A tenant with one credential (its hash fast_password_hash's) and one (by default
    active) sending domain; with network, connections from that CIDR act as the tenant
    without AUTH (plain sockets suffice)."""
    from unittest import mock

    from models.db import make_engine, session_scope
    from protocol import domains, tenants

    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            tenants.add_tenant(s, name)
            with mock.patch.object(tenants, "hash_password", fast_password_hash):
                password = tenants.add_credential(s, name, f"{name}-app")
            domains.add_domain(s, home.keybox, name, domain)
            if activate:
                domains.mark_domain_active(s, domain, "tests", "fixture")
            if network:
                tenants.add_network(s, name, network)
            s.commit()
    finally:
        engine.dispose()
    return Tenant(name, domain, f"{name}-app", password)


# ---------------------------------------------------------------- the process wrapper
class AxiomProcess:
    """One axiom process: `command` (default `axiom ARGS…`) with `env`, its output in `log`.

    `ready(process)` says when it may be used (a line in its log, a port that answers); start()
    waits for it and fails with the log's tail if the process exits or the time runs out.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log: Path,
        *,
        ready: Callable[[AxiomProcess], bool],
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
    ):
        self.command = list(command or [str(VENV_BIN / "axiom"), *args])
        self.env = dict(env)
        self.log = log
        self.cwd = cwd
        self.name = name or f"axiom {' '.join(args)}".strip()
        self._ready = ready
        self.proc: subprocess.Popen | None = None

    # Whether the process may be forked from the tests' CLI zygote (testbed/cli.py) rather
    # than started afresh: the same entry point without a second of imports. The relay,
    # `axiom deliver`, `axiom control` and `axiom flows serve` are, when they run the axiom
    # command with the tests' own Python settings (Prefect, which the zygote never imports,
    # is imported after the fork, from the command's own environment); the benchmarks start
    # theirs afresh (bench/setups.py), as an operator does.
    forkable = False

    def launch(self) -> AxiomProcess:
        """Start the process without waiting for it (wait_ready() does)."""
        from testbed import cli

        args = self.command[1:]
        if self.forkable and self.command[0] == str(VENV_BIN / "axiom") and cli.can_fork(self.env):
            self.proc = cli.Forked(args, self.env, self.log, cwd=self.cwd)
            return self
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its children (listener processes) share the group
                cwd=self.cwd,
            )
        return self

    def wait_ready(self, timeout: float = 30) -> AxiomProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready(self):
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {timeout}s:\n{self.tail()}")

    def start(self, timeout: float = 30) -> AxiomProcess:
        return self.launch().wait_ready(timeout)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def pgid(self) -> int:
        """Its process group (it leads one), for CPU accounting of it and its children."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, size: int = 3000) -> str:
        return self.output()[-size:]

    def kill9(self) -> None:
        """SIGKILL of the process itself, as a crash would; its group is left as a crash
        leaves it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait for its exit status; SIGKILL of the whole group if it does not
        exit within timeout. None if it never ran."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of its group, if anything
        return self.proc.wait()


def log_says(marker: bytes) -> Callable[[AxiomProcess], bool]:
    return lambda process: marker in process.log.read_bytes() if process.log.exists() else False


def answers(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- the processes
class RelayProcess(AxiomProcess):
    """`axiom relay` in a home: ready when it says so and its submission port answers."""

    forkable = True

    def __init__(
        self,
        home: AxiomHome,
        extra_env: Mapping[str, str] | None = None,
        *,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ):
        self.home = home
        self.extra_env = dict(extra_env or {})
        super().__init__(
            ["relay"],
            home.env | self.extra_env,
            log or home.path / "relay.log",
            ready=lambda p: log_says(b"axiom relay ready")(p) and answers(self.submission),
            command=command,
            cwd=cwd,
        )

    @property
    def submission(self) -> tuple[str, int]:
        return self.home.host, self.home.ports["submission"]

    @property
    def submission_tls(self) -> tuple[str, int]:
        return self.home.host, self.home.ports["submission_tls"]

    @property
    def http(self) -> str:
        return f"http://{self.home.host}:{self.home.ports['http']}"

    @property
    def inbound(self) -> tuple[str, int]:
        host, _, port = self.home.inbound_listen.rpartition(":")
        return host, int(port)

    def start(self, timeout: float = 30) -> RelayProcess:
        super().start(timeout)
        return self


class DeliverProcess(AxiomProcess):
    """`axiom deliver` (delivery only, no listeners): ready when its own pid says so; node_id
    is the name its claims carry (recipient.lease_owner)."""

    READY = re.compile(r"axiom deliver ready pid=(\d+) node=(\S+)")
    forkable = True

    def __init__(self, home: AxiomHome, name: str, env: Mapping[str, str]):
        self.node_id = ""
        super().__init__(
            ["deliver"],
            home.env | dict(env),
            home.path / f"deliver-{name}.log",
            ready=lambda p: self._read_node_id(),
        )

    def _read_node_id(self) -> bool:
        assert self.proc is not None
        mine = [n for pid, n in self.READY.findall(self.output()) if int(pid) == self.proc.pid]
        if mine:
            self.node_id = mine[-1]
        return bool(mine)

    def start(self, timeout: float = 30) -> DeliverProcess:
        super().start(timeout)
        return self


class ControlProcess(AxiomProcess):
    """`axiom control` in a home on a port of its own: ready when it says so and /healthz
    answers 200."""

    forkable = True

    def __init__(self, home: AxiomHome, extra_env: Mapping[str, str] | None = None):
        self.home = home
        self.port = free_port()
        super().__init__(
            ["control"],
            home.env | {"AXIOM_CONTROL_LISTEN": f"127.0.0.1:{self.port}"} | dict(extra_env or {}),
            home.path / "control.log",
            ready=lambda p: log_says(b"axiom control ready")(p) and self._healthy(),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def refused(self, reason: str) -> float:
        """axiom_slack_requests_refused_total{reason} read from /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(f'axiom_slack_requests_refused_total{{reason="{reason}"}}'):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no refusal counter for {reason}:\n{text}")

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def start(self, timeout: float = 30) -> ControlProcess:
        super().start(timeout)
        return self


class FlowsProcess(AxiomProcess):
    """`axiom flows serve` in a home, against a Prefect server: the control plane's runner.

    It polls Prefect every second (PREFECT_RUNNER_POLL_FREQUENCY; 10 s by default) so a test
    waits seconds, not tens of seconds, for a run to be taken up.
    """

    forkable = True  # `axiom flows serve`; a test's own runner (command=…) starts afresh

    def __init__(
        self,
        home: AxiomHome,
        prefect_env: Mapping[str, str],
        command: Sequence[str] | None = None,
        **extra_env: str,
    ):
        """command: another runner printing "flows ready" (a test's own flows), run from
        the checkout's root so that tests/ imports."""
        env = home.env | dict(prefect_env) | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"} | extra_env
        env["AXIOM_PREFECT_API_URL"] = env["PREFECT_API_URL"]
        super().__init__(
            ["flows", "serve"],
            env,
            home.path / "flows.log",
            ready=log_says(b"flows ready"),
            command=command,
            cwd=Path(__file__).resolve().parent.parent if command else None,
        )

    def start(self, timeout: float = 60) -> FlowsProcess:
        super().start(timeout)
        return self

    def kill_all(self) -> None:
        """SIGKILL to the runner and every flow run it started, as a crash of the machine
        would leave them."""
        assert self.proc is not None
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def flow_run_processes(runner: int) -> list[int]:
    """The flow runs an `axiom flows serve` process holds: everything below it except the
    multiprocessing forkserver its runs are forked from and that server's resource tracker,
    which it keeps while no run exists (axiom/flow_runs.py). A forked run keeps the
    forkserver's command line, so only the runner's own children are told apart by theirs."""
    servers = {
        child
        for child in _children(runner)
        if any(
            marker in _cmdline(child)
            for marker in (b"multiprocessing.forkserver", b"multiprocessing.resource_tracker")
        )
    }
    return [p for p in descendants(runner) if p not in servers]


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in found]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, theirs, …), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie is no process
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
