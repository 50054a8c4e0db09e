"""A new test database, migrated fast: a new SQLite file is a copy of one this process migrated
once (Alembic's ten migrations cost about 0.45 s a database, and several hundred tests each
make one); anything else — a PostgreSQL schema, a file already holding data — is migrated.

The copy is the migrations' own result, not `create_all`: tests/unit/test_migrations.py checks
that result against the models, and the template is made by the same `migrate`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

from sqlalchemy.engine import make_url

_lock = threading.Lock()
_template: Path | None = None


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


def migrate_new(url: str) -> None:
    """Bring a test's database to the models' schema (see above)."""
    from models.db import migrate

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
