"""`axiom up`: the whole product on one machine, supervised as one process tree.

Starts, in order, each probed for health before the next: the Prefect server (UI + API),
the sandbox world (simulated receivers and DNS), the relay (submission + delivery + HTTP),
the control process (Slack interactivity, axiom/control.py) and the served Protocol flows.
Prints where everything is once all are ready — and how to put `axiom` on PATH when it is
not — writes AXIOM_HOME/up.json for scripts, and stops everything on Ctrl-C/SIGTERM or when
any part dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from config.settings import Settings, split_host_port

log = logging.getLogger("axiom.up")
BIN = Path(sys.executable).parent
DEMO_TENANT = "demo"
DEMO_USER = "demo-app"


class StartupError(Exception):
    """A part did not become healthy; the message says which and why."""


@dataclass
class Part:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_line: str | None = None  # printed on the part's stdout when it listens
    probe_url: str | None = None  # answers 200 when healthy
    timeout: float = 90
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def start(self, logs: Path) -> None:
        self.log_path = logs / f"{self.name}.log"
        out = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartupError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if self._ready():
                return
            time.sleep(0.2)
        raise StartupError(f"{self.name} not healthy after {self.timeout:.0f}s: {self.tail()}")

    def _ready(self) -> bool:
        if self.ready_line and self.ready_line.encode() not in self.log_path.read_bytes():
            return False
        if self.probe_url:
            try:
                with urllib.request.urlopen(self.probe_url, timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
        return True

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HomeLock:
    """One `axiom up` per home: a second one refuses instead of corrupting state."""

    def __init__(self, home: Path):
        self.path = home / "up.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode().strip() or "another process"
            os.close(fd)
            raise StartupError(
                f"axiom up is already running on {self.path.parent} (pid {holder}); "
                "stop it first or use another AXIOM_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def _json_log(home: Path) -> logging.Handler:
    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps(
                {
                    "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                    "level": record.levelname,
                    "logger": record.name,
                    "message": record.getMessage(),
                }
            )

    handler = logging.FileHandler(home / "logs" / "axiom.jsonl")
    handler.setFormatter(JsonFormatter())
    return handler


def ensure_demo(settings: Settings) -> dict:
    """The demo tenant, credential and sending domain, created once and reused."""
    from models.db import make_engine, session_scope
    from protocol import domains, tenants

    path = settings.home / "demo.json"
    if path.exists():
        return json.loads(path.read_text())
    domain = settings.sandbox_demo_domain
    engine = make_engine(settings.db_url)
    try:
        with session_scope(engine) as s:
            tenants.add_tenant(s, DEMO_TENANT, "en")
            password = tenants.add_credential(s, DEMO_TENANT, DEMO_USER)
            from relay.submission.keystore import KeyBox

            domains.add_domain(s, KeyBox(settings.load_secret_key()), DEMO_TENANT, domain)
            domains.mark_domain_active(
                s,
                domain,
                "axiom-up",
                "sandbox demo domain: its records are served by the sandbox DNS",
            )
            s.commit()
    finally:
        engine.dispose()
    demo = {"tenant": DEMO_TENANT, "username": DEMO_USER, "password": password, "domain": domain}
    path.write_text(json.dumps(demo))
    path.chmod(0o600)
    return demo


def child_env(settings: Settings) -> dict[str, str]:
    prefect_host, prefect_port = split_host_port(settings.prefect_listen)
    api = f"http://{prefect_host}:{prefect_port}/api"
    env = dict(os.environ)
    env.update(
        AXIOM_HOME=str(settings.home.resolve()),
        AXIOM_DATABASE_URL=settings.db_url,
        PREFECT_API_URL=api,
        PREFECT_UI_API_URL=api,
        PREFECT_HOME=str((settings.home / "prefect").resolve()),
        PREFECT_API_DATABASE_CONNECTION_URL=os.environ.get(
            "PREFECT_API_DATABASE_CONNECTION_URL",
            f"sqlite+aiosqlite:///{(settings.home / 'prefect' / 'prefect.db').resolve()}",
        ),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    # The relay reaches the sandbox world by settings only: its DNS and its MX port.
    from sandbox.world import relay_environment

    env.update(relay_environment(settings))
    if settings.inbound_listen:  # the simulated feedback loops report to the relay's inbound
        env.update(
            AXIOM_SANDBOX_FEEDBACK_SMTP=settings.inbound_listen,
            AXIOM_SANDBOX_FEEDBACK_ADDRESS=settings.feedback_mailbox,
        )
    return env


def parts(settings: Settings) -> list[Part]:
    env = child_env(settings)
    prefect_host, prefect_port = split_host_port(settings.prefect_listen)
    http_host, http_port = split_host_port(settings.http_listen)
    control_host, control_port = split_host_port(settings.control_listen)
    axiom = str(BIN / "axiom")
    return [
        Part(
            "prefect",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                prefect_host,
                "--port",
                str(prefect_port),
            ],
            env,
            probe_url=f"http://{prefect_host}:{prefect_port}/api/health",
            timeout=120,
        ),
        # python -m sandbox: the world's process imports no relay code (sandbox/__main__.py)
        Part("sandbox", [sys.executable, "-m", "sandbox", "run"], env, ready_line="sandbox ready"),
        Part(
            "relay",
            [axiom, "relay"],
            env,
            ready_line="axiom relay ready",
            probe_url=f"http://{http_host}:{http_port}/healthz",
        ),
        Part(
            "control",
            [axiom, "control"],
            env,
            ready_line="axiom control ready",
            probe_url=f"http://{control_host}:{control_port}/healthz",
        ),
        Part("flows", [axiom, "flows", "serve"], env, ready_line="flows ready", timeout=120),
    ]


def banner(settings: Settings, demo: dict) -> dict:
    from notifications.slack import approval_channels  # where checkpoints can be answered

    sub_host, sub_port = split_host_port(settings.submission_listen)
    prefect_host, prefect_port = split_host_port(settings.prefect_listen)
    info = {
        "submission": settings.submission_listen,
        "submission_tls": settings.submission_tls_listen,
        "inbound": settings.inbound_listen,  # bounces and complaint reports; None: off
        "feedback_address": settings.feedback_mailbox,
        "http": f"http://{settings.http_listen}",
        "control": f"http://{settings.control_listen}",
        "slack_interactivity": f"http://{settings.control_listen}/slack/interactivity",
        "prefect_ui": f"http://{prefect_host}:{prefect_port}",
        "prefect_api": f"http://{prefect_host}:{prefect_port}/api",
        "sandbox_dns": settings.sandbox_dns_listen,
        "tenant": demo["tenant"],
        "username": demo["username"],
        "password": demo["password"],
        "domain": demo["domain"],
        "swaks": (
            f"swaks --server {sub_host}:{sub_port} --tls --auth PLAIN "
            f"--auth-user {demo['username']} --auth-password '{demo['password']}' "
            f"--from hello@{demo['domain']} --h-From 'Demo <hello@{demo['domain']}>' "
            "--to someone@gmail.com"
        ),
        "pid": os.getpid(),
        "approvals": approval_channels(settings),
        "path": path_hint(),
    }
    return info


def path_hint(search_path: str | None = None) -> str | None:
    """The line that puts this install's `axiom` on PATH; None when `axiom` already is it."""
    found = shutil.which("axiom", path=search_path)
    if found and Path(found).resolve() == (BIN / "axiom").resolve():
        return None
    return f'export PATH="{BIN}:$PATH"'


def run(settings: Settings, console: Console) -> int:
    from axiom.setup import initialise

    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False), _json_log(settings.home)],
        force=True,
    )
    lock = HomeLock(settings.home)
    lock.acquire()
    running: list[Part] = []
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        log.info("initialising %s", settings.home)
        initialise(settings, say=log.info)
        demo = ensure_demo(settings)
        for part in parts(settings):
            if stopping:
                return 0
            log.info("starting %s", part.name)
            part.start(settings.home / "logs")
            running.append(part)
            part.wait_ready()
            log.info("%s is ready", part.name)
        info = banner(settings, demo)
        (settings.home / "up.json").write_text(json.dumps(info, indent=2))
        _print_banner(console, info)
        while not stopping:
            for part in running:
                if part.proc.poll() is not None:
                    raise StartupError(
                        f"{part.name} stopped unexpectedly ({part.proc.returncode}): {part.tail()}"
                    )
            time.sleep(0.5)
        log.info("stopping")
        return 0
    finally:
        for part in reversed(running):
            part.stop()
        with contextlib.suppress(OSError):
            (settings.home / "up.json").unlink()
        lock.release()


def _print_banner(console: Console, info: dict) -> None:
    console.print(
        f"[bold green]Axiom Send is ready[/bold green] (pid {info['pid']})", highlight=False
    )
    console.print(
        f"  submission   {info['submission']} (STARTTLS), {info['submission_tls']} (implicit TLS)\n"
        + (
            f"  inbound      {info['inbound']} (bounces, ARF reports to {info['feedback_address']})\n"
            if info["inbound"]
            else ""
        )
        + f"  demo tenant  {info['tenant']}  user {info['username']}  password {info['password']}\n"
        f"  demo domain  {info['domain']} (onboarded in the sandbox)\n"
        f"  Prefect UI   {info['prefect_ui']}\n"
        f"  {info['approvals']}\n"
        f"  health       {info['http']}/healthz   metrics {info['http']}/metrics\n"
        f"  control      {info['control']}: /slack/interactivity, /healthz, /metrics\n"
        f"  send one:    {info['swaks']}\n"
        + (f"  PATH:        {info['path']}\n" if info["path"] else "")
        + "  stop:        Ctrl-C",
        highlight=False,
        soft_wrap=True,
    )
