"""A new test database, migrated fast (Alembic's ten migrations cost about 0.45 s a database,
and several hundred tests each make one):

- a new SQLite file is a copy of one this process migrated once;
- a new PostgreSQL schema (the tests' `search_path` URLs) gets the statements this process's
  first PostgreSQL migration sent, replayed in one transaction: the same SQL without Alembic
  around it (0.21 against 0.40 core-seconds a schema, PostgreSQL's own work included). The
  migrations write no schema name (the URL's search_path places everything), which recording
  checks, or every schema is migrated;
- anything else (a file already holding data, a URL without a search_path) is migrated.

Both are the migrations' own result, not `create_all`: tests/unit/test_migrations.py checks
that result against the models, and that a replayed schema equals a migrated one.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

_lock = threading.Lock()
_template: Path | None = None
# The first PostgreSQL migration's statements: (statement, parameters, executemany).
_pg_statements: list[tuple[str, object, bool]] | None = None
_pg_recorded = False  # recording was tried (the list stays None when it cannot be replayed)
_TABLES = "SELECT count(*) FROM information_schema.tables WHERE table_schema = %(s)s"


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _migrated_template() -> Path:
    global _template
    from models.db import make_engine, migrate

    with _lock:
        if _template is None:
            folder = Path(tempfile.mkdtemp(prefix="axiom-schema-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            path = folder / "migrated.db"
            migrate(f"sqlite:///{path}")
            make_engine(f"sqlite:///{path}").dispose()  # the WAL checkpointed into the file
            _template = path
        return _template


def _search_path_schema(url: str) -> str | None:
    """The schema a PostgreSQL URL's `options=-csearch_path=NAME` places everything in."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        return None
    options = parsed.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    prefix = "-csearch_path="
    found = [o[len(prefix) :] for o in options.split() if o.startswith(prefix)]
    if len(found) != 1 or "," in found[0]:
        return None
    return found[0]


def _replay_ready_to_record(url: str, schema: str) -> bool:
    """Whether the schema is empty, so that its migration is the whole schema's SQL."""
    from models.db import make_engine

    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()
            cursor.execute(_TABLES, {"s": schema})
            return cursor.fetchone()[0] == 0
    finally:
        engine.dispose()


def _migrate_recording(url: str, schema: str) -> None:
    """migrate(url), keeping what it sent over its own connections for replay."""
    global _pg_statements, _pg_recorded
    from models.db import migrate

    sent: list[tuple[str, object, bool]] = []
    if not _replay_ready_to_record(url, schema):
        migrate(url)  # a schema holding tables teaches nothing about an empty one
        return

    def keep(conn, cursor, statement, parameters, context, executemany):
        # Alembic's own engine (its URL normalised by models.db) on the same schema.
        if _search_path_schema(conn.engine.url.render_as_string(False)) == schema:
            sent.append((statement, parameters, executemany))

    event.listen(Engine, "before_cursor_execute", keep)
    try:
        migrate(url)
    finally:
        event.remove(Engine, "before_cursor_execute", keep)
    _pg_recorded = True
    # A statement naming the schema would write into the first test's schema on replay.
    if sent and not any(schema in statement for statement, _, _ in sent):
        _pg_statements = sent


def _replay(url: str, schema: str) -> bool:
    """The recorded statements into an empty schema, in one transaction; False (nothing done)
    when the schema already has tables (migrated before, or holding data)."""
    from models.db import make_engine

    engine = make_engine(url, pool_size=1)
    try:
        with engine.begin() as conn:
            cursor = conn.connection.dbapi_connection.cursor()
            cursor.execute(_TABLES, {"s": schema})
            if cursor.fetchone()[0] > 0:
                return False
            for statement, parameters, executemany in _pg_statements or ():
                if executemany:
                    cursor.executemany(statement, parameters)
                else:
                    cursor.execute(statement, parameters or None)
        return True
    finally:
        engine.dispose()


def migrate_new(url: str) -> None:
    """Bring a test's database to the models' schema (see above)."""
    from models.db import migrate

    schema = _search_path_schema(url)
    if schema is not None:
        with _lock:
            first = not _pg_recorded
            if first:
                _migrate_recording(url, schema)
        if first or (_pg_statements is not None and _replay(url, schema)):
            return
        migrate(url)  # not replayable, or not empty: Alembic decides
        return
    path = _sqlite_file(url)
    if path is None or (path.exists() and path.stat().st_size > 0):
        migrate(url)
        return
    template = _migrated_template()
    if Path(f"{template}-wal").exists():  # not checkpointed: copying would lose a part
        migrate(url)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
