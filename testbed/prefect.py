"""A private Prefect server (`prefect server start`) on a free loopback port.

A new server starts from a copy of an empty database already migrated (made once per machine
and Prefect version with `prefect server database upgrade`, under a file lock so parallel test
workers make it once): migrating Prefect's schema is most of a first start (16 s against 9 s
measured side by side on the 2-core machine), and every test module starts its own server.

Its PREFECT_HOME and SQLite database live in a temporary directory that survives stop(), so
start() after stop() brings back the same server with the same state on the same port: an
outage of the control plane, not a new one. The server and everything it spawns run in their
own process group, which stop() ends; an atexit hook stops whatever a crashed run left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from testbed.postfix import free_port

VENV_BIN = Path(sys.executable).parent

_live: set[PrefectServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.destroy()


class PrefectError(RuntimeError):
    """The server did not come up; the message carries its log."""


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


def migrated_template() -> Path:
    """An empty Prefect database at the installed version's head, made once (see above)."""
    folder = Path(tempfile.gettempdir())
    template = folder / f"axiom-prefect-{_prefect_version()}-empty.db"
    if template.exists():
        return template
    with open(folder / f"{template.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it
        if template.exists():
            return template
        work = Path(tempfile.mkdtemp(prefix="axiom-prefect-template-"))
        try:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                "PREFECT_HOME": str(work),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
            done = subprocess.run(
                [str(VENV_BIN / "prefect"), "server", "database", "upgrade", "-y"],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                raise PrefectError(
                    f"prefect server database upgrade failed:\n{done.stdout}{done.stderr}"
                )
            shutil.copy(work / "prefect.db", f"{template}.part")
            os.replace(f"{template}.part", template)  # whole or absent
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return template


class PrefectServer:
    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.home = Path(tempfile.mkdtemp(prefix="axiom-prefect-"))
        self.logfile = self.home / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        """Environment for the server and for clients of it."""
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }

    def start(self, timeout: float = 90) -> PrefectServer:
        database = self.home / "prefect.db"
        if not database.exists():  # a new server (a restart keeps its own database)
            shutil.copy(migrated_template(), database)
        with open(self.logfile, "ab") as out:
            self._proc = subprocess.Popen(
                [
                    str(VENV_BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _live.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrefectError(f"prefect server exited {self._proc.returncode}:\n{self.log()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise PrefectError(f"prefect server not healthy in {timeout}s:\n{self.log()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.api_url}{path}", timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> object:
        request = urllib.request.Request(
            f"{self.api_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # a service child that outlived the parent
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            _live.discard(self)
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()
