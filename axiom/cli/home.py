"""Whether the settings point at an initialised Axiom home, found without creating anything.

A home is initialised when its database holds Alembic's `alembic_version` table with a
revision: `axiom init` (and `axiom up`, which runs it) writes that row when it migrates the
schema, and nothing else does. On SQLite the file is opened read-only, so asking never leaves
an empty `axiom.db` behind; on PostgreSQL the check is one catalogue read.
"""

from __future__ import annotations

import os
import sqlite3
import tomllib
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from models.db import make_engine

VERSION_TABLE = "alembic_version"


class HomeMissing(Exception):
    """One line: where the home was looked for, why it is not one, and how to make one."""


def require_home(settings: Settings) -> None:
    if settings.db_url.startswith("sqlite"):
        _require_sqlite(settings)
    else:
        _require_server(settings)


def _require_sqlite(settings: Settings) -> None:
    database = Path(make_url(settings.db_url).database or "")
    if not database.is_file():
        raise HomeMissing(_no_home(settings, f"no database at {database}"))
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (VERSION_TABLE,)
            ).fetchone()
            revision = found and conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
    except sqlite3.Error as exc:
        raise HomeMissing(f"cannot read the database {database}: {exc}") from None
    if not revision:
        raise HomeMissing(_no_home(settings, f"{database} has no Axiom schema"))


def _require_server(settings: Settings) -> None:
    url = make_url(settings.db_url).render_as_string(hide_password=True)
    engine = make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            revision = (
                inspect(conn).has_table(VERSION_TABLE)
                and conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
            )
    except SQLAlchemyError as exc:
        reason = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0]
        raise HomeMissing(
            f"cannot reach the database {url} (AXIOM_DATABASE_URL): {reason}"
        ) from None
    finally:
        engine.dispose()
    if not revision:
        raise HomeMissing(
            f"no Axiom schema in {url} (AXIOM_DATABASE_URL); "
            "run 'axiom init' with these settings to create it"
        )


def _no_home(settings: Settings, why: str) -> str:
    home = settings.home.resolve()
    return (
        f"no Axiom home at {home} ({_home_source()}: {why}); "
        f"run 'axiom init' to make one there, or set AXIOM_HOME"
    )


def _home_source() -> str:
    """Which setting named the home, so the person knows what to change."""
    if "AXIOM_HOME" in os.environ:
        return "AXIOM_HOME"
    config = Path(os.environ.get("AXIOM_CONFIG", "axiom.toml"))
    try:
        if "home" in tomllib.loads(config.read_text()):
            return f"home in {config}"
    except (OSError, tomllib.TOMLDecodeError):
        pass
    return "the default ./var"
