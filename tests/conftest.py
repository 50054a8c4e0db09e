"""Shared fixtures: every database test runs on SQLite and on PostgreSQL; real relay processes."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from config.tls import write_self_signed
from models.db import make_engine, migrate, normalise_url, session_scope
from relay.submission.keystore import KeyBox
from testbed.postfix import free_port

PG_URL = os.environ.get("AXIOM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def postgres_admin():
    """A PostgreSQL that cannot be reached fails the run; it is never skipped."""
    engine = create_engine(normalise_url(PG_URL), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {PG_URL} is required by the tests and unreachable: {exc}")
    yield engine
    engine.dispose()


def _pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a private schema in PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'axiom.db'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    schema = f"t_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield _pg_schema_url(schema)
    with admin.connect() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture
def engine(db_url):
    migrate(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine):
    with session_scope(engine) as s:
        yield s


@dataclass
class AxiomHome:
    """An initialised AXIOM_HOME with its own database and free ports."""

    path: Path
    db_url: str
    secret: bytes
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def inbound_listen(self) -> str:
        """Each home's relay its own inbound listener (relay/inbound.py), so relays run side
        by side; allocated on first use for homes built with the three submission ports."""
        if "inbound" not in self.ports:
            self.ports["inbound"] = free_port()
        return f"127.0.0.1:{self.ports['inbound']}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXIOM_")}
        env.update(
            AXIOM_HOME=str(self.path),
            AXIOM_DATABASE_URL=self.db_url,
            AXIOM_SUBMISSION_LISTEN=f"127.0.0.1:{self.ports['submission']}",
            AXIOM_SUBMISSION_TLS_LISTEN=f"127.0.0.1:{self.ports['submission_tls']}",
            AXIOM_HTTP_LISTEN=f"127.0.0.1:{self.ports['http']}",
            AXIOM_INBOUND_LISTEN=self.inbound_listen,
            AXIOM_CONFIG=str(self.path / "axiom.toml"),
            PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        )
        return env

    def cli(self, *args: str, check: bool = True, input: str | None = None, extra_env=None):
        env = self.env | (extra_env or {})
        result = subprocess.run(
            [str(VENV_BIN / "axiom"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"axiom {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result

    @property
    def keybox(self) -> KeyBox:
        return KeyBox(self.secret)


@pytest.fixture
def axiom_home(tmp_path, db_url) -> AxiomHome:
    home = tmp_path / "home"
    home.mkdir()
    secret = KeyBox.generate()
    (home / "secret.key").write_bytes(secret)
    write_self_signed(home / "tls" / "cert.pem", home / "tls" / "key.pem", "relay.axiom.test")
    migrate(db_url)
    _default_pool(db_url)  # what `axiom init` does after migrating
    return AxiomHome(
        home,
        db_url,
        secret,
        {"submission": free_port(), "submission_tls": free_port(), "http": free_port()},
    )


def _default_pool(db_url: str) -> None:
    from protocol.egress import ensure_default_pool

    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            ensure_default_pool(s)
            s.commit()
    finally:
        engine.dispose()


@dataclass
class Tenant:
    name: str
    domain: str
    username: str
    password: str


def seed_tenant(home: AxiomHome, name: str, domain: str, *, activate: bool = True) -> Tenant:
    """A tenant with one credential and one (by default active) sending domain."""
    from protocol import domains, tenants

    engine = make_engine(home.db_url)
    try:
        with session_scope(engine) as s:
            tenants.add_tenant(s, name)
            password = tenants.add_credential(s, name, f"{name}-app")
            domains.add_domain(s, home.keybox, name, domain)
            if activate:
                domains.mark_domain_active(s, domain, "tests", "fixture")
            s.commit()
    finally:
        engine.dispose()
    return Tenant(name, domain, f"{name}-app", password)


class RelayProcess:
    def __init__(self, home: AxiomHome, extra_env: dict[str, str] | None = None):
        self.home = home
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.log = home.path / "relay.log"

    @property
    def submission(self) -> tuple[str, int]:
        return "127.0.0.1", self.home.ports["submission"]

    @property
    def submission_tls(self) -> tuple[str, int]:
        return "127.0.0.1", self.home.ports["submission_tls"]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.home.ports['http']}"

    @property
    def inbound(self) -> tuple[str, int]:
        host, _, port = self.home.inbound_listen.rpartition(":")
        return host, int(port)

    def start(self, timeout: float = 30) -> RelayProcess:
        logf = open(self.log, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "axiom"), "relay"],
            env=self.home.env | self.extra_env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        port = self.home.ports["submission"]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"relay exited {self.proc.returncode}:\n{self.log.read_text()}"
                )
            if b"axiom relay ready" in self.log.read_bytes():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"relay not ready in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def relay(axiom_home) -> Iterator[RelayProcess]:
    proc = RelayProcess(axiom_home).start()
    yield proc
    proc.stop()
