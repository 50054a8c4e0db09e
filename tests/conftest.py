"""Shared fixtures: every database test runs on SQLite and on PostgreSQL; real relay processes.

The homes and process wrappers themselves live in testbed/axiom.py (bench/ uses them too);
their names are re-exported here for the tests that import them from this module.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from models.db import make_engine, normalise_url, session_scope
from testbed.axiom import (
    VENV_BIN,
    AxiomHome,
    RelayProcess,
    Tenant,
    make_home,
    seed_tenant,
)
from testbed.postfix import free_port
from testbed.schema import migrate_new

PG_URL = os.environ.get("AXIOM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

__all__ = [
    "PG_URL",
    "VENV_BIN",
    "AxiomHome",
    "RelayProcess",
    "Tenant",
    "free_port",
    "seed_tenant",
]


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


@pytest.fixture(scope="module")
def prefect():
    """A private Prefect server for the module's tests (testbed/prefect.py), this process's
    Prefect client pointed at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from testbed.prefect import PrefectServer

    server = PrefectServer().start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        server.destroy()


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
    migrate_new(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine):
    with session_scope(engine) as s:
        yield s


@pytest.fixture
def axiom_home(tmp_path, db_url) -> AxiomHome:
    """What `axiom init` leaves behind (testbed/axiom.py), on this test's database."""
    return make_home(tmp_path / "home", db_url)


@pytest.fixture
def relay(axiom_home) -> Iterator[RelayProcess]:
    proc = RelayProcess(axiom_home).start()
    yield proc
    proc.stop()


@pytest.fixture
def cli(tmp_path, db_url, monkeypatch):
    """The axiom CLI in this process against a fresh home (make_home): cli("stats", "--json")
    returns typer's Result; cli.home is the home."""
    from typer.testing import CliRunner

    from axiom.cli import app

    home = make_home(tmp_path / "home", db_url)
    for key, value in home.env.items():
        if key.startswith("AXIOM_"):
            monkeypatch.setenv(key, value)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    run.home = home
    return run


def pytest_collection_modifyitems(session, config, items):
    """Longest modules first (tests/durations.py); a module's tests stay together, in order."""
    from tests.durations import load

    seconds = load()
    order = {
        module: n for n, module in enumerate(dict.fromkeys(i.nodeid.split("::")[0] for i in items))
    }
    items.sort(key=lambda i: (-seconds.get(m := i.nodeid.split("::")[0], 0.0), order[m]))


def pytest_terminal_summary(terminalreporter):
    """Measurements tests record (record_property("measurement", text)) — figures reported,
    never asserted, such as the classifier's agreement on its held-back corpus — printed at
    the end of the run, from xdist workers too."""
    lines = [
        value
        for report in terminalreporter.stats.get("passed", [])
        if report.when == "call"
        for key, value in report.user_properties
        if key == "measurement"
    ]
    if lines:
        terminalreporter.section("measurements")
        for line in lines:
            terminalreporter.write_line(line)
