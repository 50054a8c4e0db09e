"""A throwaway PostgreSQL cluster on loopback, to stop and start at will (outage tests).

The shared cluster on 127.0.0.1:5432 serves every other test and is never touched: this one
is created by initdb in a temporary directory owned by the `postgres` user, listens on a free
loopback port with its socket in that directory, and runs as `postgres` (root may not run a
server). fsync is off: it is a throwaway, and no test crashes the machine under it.

    with PostgresCluster() as pg:
        url = pg.url           # postgresql://postgres@127.0.0.1:PORT/axiom
        pg.stop()              # clients now get "connection refused"
        pg.start()             # same data, same port

stop() defaults to the "fast" mode (disconnect every session, shut down cleanly);
`stop(mode="immediate")` is the crash-like one. Every server started is stopped at
interpreter exit at the latest.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from testbed.postfix import free_port

PG_BIN = Path(os.environ.get("AXIOM_PG_BIN", "/usr/lib/postgresql/15/bin"))
OWNER = "postgres"

_live: set[PostgresCluster] = set()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.destroy()


class PostgresError(RuntimeError):
    """The cluster failed to initialise, start or stop; the message carries its log."""


class PostgresCluster:
    def __init__(self, database: str = "axiom", *, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.database = database
        self.root = Path(tempfile.mkdtemp(prefix="axiom-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self._owner = pwd.getpwnam(OWNER)
        os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://{OWNER}@{self.host}:{self.port}/{self.database}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OWNER, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{self.log()}"
            )
        return result

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30) -> PostgresCluster:
        if not self._initialised:
            self._run(
                "initdb", "-D", str(self.data), "-A", "trust", "-U", OWNER, "-E", "UTF8",
                "--no-sync", "--no-instructions",
            )  # fmt: skip
            self._initialised = True
            created = True
        else:
            created = False
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={self.host} -c fsync=off"
            " -c full_page_writes=off -c max_connections=100"
        )
        _live.add(self)
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.logfile), "-w",
            "-t", str(int(timeout)), "start",
        )  # fmt: skip
        if created:
            self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", OWNER, self.database)
        return self

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shut the server down and wait until it is gone (pg_ctl -w)."""
        if not self.running:
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)), "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def wait_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", self.host, "-p", str(self.port)],
                capture_output=True,
                timeout=10,
            )
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise PostgresError(f"not accepting connections after {timeout}s:\n{self.log()}")

    def destroy(self) -> None:
        """Stop (immediate if need be) and remove every file."""
        try:
            if self.running:
                try:
                    self.stop()
                except (PostgresError, subprocess.TimeoutExpired):
                    self.stop(mode="immediate")
        finally:
            _live.discard(self)
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()
