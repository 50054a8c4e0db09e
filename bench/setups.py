"""The systems under test and the load generator, for bench/submission.py.

Postfix instances come from testbed/postfix.py (one implementation of a private Postfix) and
the axiom process wrapper from testbed/axiom.py; this module adds what only the benchmark
needs: an `axiom relay` on a fresh AXIOM_HOME provisioned through the CLI, an OpenDKIM milter,
smtp-source runs, and CPU accounting per process group read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.axiom import VENV_BIN, AxiomProcess, answers, log_says
from testbed.postfix import PostfixError, free_port

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- CPU accounting
def group_cpu_seconds(pgids: Iterable[int]) -> float:
    """User+system CPU of every process in the groups, including reaped children (a Postfix
    master reaps its daemons, so their time lands in its cutime/cstime)."""
    wanted = set(pgids)
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # after the command: state ppid pgrp ... utime(11) stime(12) cutime(13) cstime(14)
        if int(fields[2]) in wanted:
            total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def background_load(seconds: float = 2.0) -> float:
    """Share of all cores busy while this benchmark does nothing: other work on the machine
    that will compete with every setup."""
    busy0, total0 = machine_busy()
    time.sleep(seconds)
    busy1, total1 = machine_busy()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


# ---------------------------------------------------------------- smtp-source
@dataclass
class LoadResult:
    messages: int
    elapsed: float
    server_cpu: float
    machine_busy: float  # share of all cores busy during the run, 0..1
    ok: bool
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.server_cpu / self.messages if self.messages else 0.0


def measure(run: Callable[[], tuple[int, bool, str]], pgids: Callable[[], list[int]]):
    cpu0, (busy0, total0) = group_cpu_seconds(pgids()), machine_busy()
    started = time.monotonic()
    messages, ok, detail = run()
    elapsed = time.monotonic() - started
    cpu1, (busy1, total1) = group_cpu_seconds(pgids()), machine_busy()
    busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return LoadResult(messages, elapsed, cpu1 - cpu0, busy, ok, detail)


def smtp_source(
    port: int,
    count: int,
    *,
    sessions: int = 20,
    size: int = 2048,
    sender: str = "bench@bench.test",
    recipient: str = "rcpt@example.org",
    timeout: float = 90,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, bool, str]:
    """One smtp-source run, a new connection per message. Without -A it aborts on the first
    reply that is not the expected success, so exit 0 means every message got its 250."""
    cmd = [
        SMTP_SOURCE,
        "-c",
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-l",
        str(size),
        "-f",
        sender,
        "-t",
        recipient,
        "-M",
        "client.test",
        f"127.0.0.1:{port}",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    done = [0]

    def read_counter() -> None:
        assert proc.stdout is not None
        last = time.monotonic()
        for line in proc.stdout:  # -c prints a running count of completed DATA commands
            line = line.strip()
            if line.isdigit():
                done[0] = int(line)
                if progress and time.monotonic() - last > 3:
                    progress(done[0])
                    last = time.monotonic()

    reader = threading.Thread(target=read_counter, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(2)
        return done[0], False, f"smtp-source timed out after {timeout}s"
    reader.join(5)
    assert proc.stderr is not None
    stderr = proc.stderr.read().strip()
    if proc.returncode != 0:
        return done[0], False, stderr or f"smtp-source exited {proc.returncode}"
    return count, True, ""


# ---------------------------------------------------------------- Axiom
class AxiomRelay:
    """`axiom relay` on a fresh temporary AXIOM_HOME, provisioned with the CLI as an operator
    would: a tenant, an active domain, a bound client network and a credential."""

    def __init__(
        self,
        processes: int,
        *,
        tenant: str = "bench",
        domain: str = "bench.test",
        command: list[str] | None = None,
        event_loop: str = "uvloop",
        code: Path | None = None,
    ):
        self.processes = processes
        self.event_loop = event_loop  # AXIOM_EVENT_LOOP
        self.command = command or [str(VENV_BIN / "axiom"), "relay"]  # another: profiling
        # Another checkout of the code to run (bench/instructions.py --against): it goes first
        # on PYTHONPATH and is the working directory, so the listener children (python -m
        # relay.service) import it too, not the editable install.
        self.code = code
        self.tenant = tenant
        self.domain = domain
        self.home = Path(tempfile.mkdtemp(prefix=f"axiom-bench-relay{processes}-"))
        self.port = free_port()
        self.tls_port = free_port()
        self.http_port = free_port()
        self.username = f"{tenant}-app"
        self.password = ""
        self.log = self.home / "relay.log"
        self.process: AxiomProcess | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXIOM_")}
        env.update(
            AXIOM_HOME=str(self.home),
            AXIOM_CONFIG=str(self.home / "axiom.toml"),  # none: defaults + environment
            AXIOM_SUBMISSION_LISTEN=f"127.0.0.1:{self.port}",
            AXIOM_SUBMISSION_TLS_LISTEN=f"127.0.0.1:{self.tls_port}",
            AXIOM_HTTP_LISTEN=f"127.0.0.1:{self.http_port}",
            AXIOM_INBOUND_LISTEN="off",  # bounces and ARF reports: not measured here
            AXIOM_RELAY_PROCESSES=str(self.processes),
            AXIOM_EVENT_LOOP=self.event_loop,
            # Accept only: this measures submission. (With delivery on and no DNS here, the
            # first attempt would bounce and suppress the benchmark's recipient.)
            AXIOM_DELIVERY_ENABLED="false",
            # All load comes from 127.0.0.1, standing for many clients; the per-client cap
            # (default 20) would otherwise refuse a new connection whose predecessor's close
            # the server has not processed yet. Postfix exempts mynetworks the same way.
            AXIOM_MAX_CONNECTIONS_PER_CLIENT="1000",
            PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        )
        if self.code is not None:
            env["PYTHONPATH"] = str(self.code)
        return env

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [str(VENV_BIN / "axiom"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"axiom {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def provision(self) -> None:
        self.cli("init")
        self.cli("tenant", "add", self.tenant, "--language", "en")
        self.cli("domain", "add", self.tenant, self.domain)
        self.cli("operator", "add", "bench", "--role", "lead")  # activation needs the role
        self.cli("domain", "activate", self.domain, "--as", "bench", "--reason", "benchmark")
        self.cli("credential", "add-network", self.tenant, "127.0.0.0/8")
        out = self.cli("credential", "add", self.tenant, self.username)
        match = re.search(r"^password: (\S+)$", out, re.M)
        if not match:
            raise RuntimeError(f"no password in: {out}")
        self.password = match.group(1)

    def start(self, timeout: float = 60) -> AxiomRelay:
        # the parent says "ready" once every listener process listens
        self.process = AxiomProcess(
            ["relay"],
            self.env,
            self.log,
            ready=lambda p: log_says(b"axiom relay ready")(p) and answers(("127.0.0.1", self.port)),
            command=self.command,
            cwd=self.code,
        ).start(timeout)
        return self

    @property
    def pgid(self) -> int:
        assert self.process is not None
        return self.process.pgid

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)
            self.process = None

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.home / 'axiom.db'}?mode=ro", uri=True, timeout=30)

    def spool_count(self) -> int:
        with contextlib.closing(self._db()) as db:
            return db.execute("SELECT count(*) FROM message").fetchone()[0]

    def sample(self) -> bytes:
        with contextlib.closing(self._db()) as db:
            return db.execute("SELECT data FROM message ORDER BY id DESC LIMIT 1").fetchone()[0]


# ---------------------------------------------------------------- OpenDKIM
class OpenDkim:
    """An OpenDKIM signing milter on a unix socket, RSA-2048, relaxed/relaxed like Axiom."""

    def __init__(self, domain: str, selector: str = "bench"):
        self.domain = domain
        self.selector = selector
        # OpenDKIM refuses a config or key file on a path others may write to (/tmp is
        # world-writable); /run is root's. 0755 so smtpd (user postfix) reaches the socket.
        self.root = Path(tempfile.mkdtemp(prefix="axiom-bench-opendkim-", dir="/run"))
        self.root.chmod(0o755)
        self.socket = self.root / "opendkim.sock"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> OpenDkim:
        subprocess.run(
            [
                "opendkim-genkey",
                "-b",
                "2048",
                "-d",
                self.domain,
                "-s",
                self.selector,
                "-D",
                str(self.root),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        key = self.root / f"{self.selector}.private"
        key.chmod(0o600)
        conf = self.root / "opendkim.conf"
        conf.write_text(
            "Syslog no\n"
            "Background no\n"
            "Mode s\n"
            f"Domain {self.domain}\n"
            f"Selector {self.selector}\n"
            f"KeyFile {key}\n"
            f"Socket local:{self.socket}\n"
            "UMask 000\n"
            "Canonicalization relaxed/relaxed\n"
            "SignatureAlgorithm rsa-sha256\n"
            "OversignHeaders From\n"
            "InternalHosts 127.0.0.1\n"
            f"PidFile {self.root / 'opendkim.pid'}\n"
        )
        out = open(self.root / "opendkim.out", "wb")  # noqa: SIM115 (the child keeps it)
        try:
            self._proc = subprocess.Popen(
                [OPENDKIM, "-f", "-x", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PostfixError(f"opendkim exited:\n{self.output()}")
            if self.socket.exists():
                return self
            time.sleep(0.05)
        raise PostfixError(f"opendkim socket missing after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.root / "opendkim.out").read_text(errors="replace")
        return ""

    @property
    def pgid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._proc = None
        shutil.rmtree(self.root, ignore_errors=True)
