"""One engine per process, SQLite pragmas for a durable spool, and migrations to head."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlmodel import Session

MIGRATIONS = Path(__file__).parent / "migrations"


def normalise_url(url: str) -> str:
    """Accept libpq-style URLs and pick the psycopg 3 driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        connect_args: dict = {"check_same_thread": False, "timeout": 30}
        if path and path != ":memory:" and "mode=memory" not in path:
            connect_args["factory"] = _queued_writer(Path(path.split("?", 1)[0]))
        engine = create_engine(url, connect_args=connect_args)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take the write lock up front instead
        # so two writers queue rather than failing on lock upgrade.
        event.listen(engine, "begin", _begin_immediate)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


def _begin_immediate(conn) -> None:
    wait_for_write_turn(conn.connection.dbapi_connection)
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def wait_for_write_turn(dbapi_conn) -> None:
    """Queue for the write lock (see _QueuedWriter); a no-op for other connections."""
    if isinstance(dbapi_conn, _QueuedWriter):
        dbapi_conn.wait_for_turn()


class _QueuedWriter(sqlite3.Connection):
    """A SQLite connection whose write transactions queue on a file lock (flock).

    SQLite makes a second writer poll: its busy handler sleeps 1, 2, 5, 10 … 100 ms between
    tries. With several relay processes on one file (AXIOM_RELAY_PROCESSES) their spool
    writers and delivery engines kept finding the lock taken and slept while the CPUs idled
    (84 % busy at peak in bench/submission.py). Here a writer first takes an flock on a lock
    file beside the database, trying again every 50 µs to 0.5 ms, so the next writer starts
    within half a millisecond of the lock being given back. The wait is bounded like SQLite's
    busy_timeout (a stuck holder gives "database is locked", which the relay answers with 451,
    rather than hanging every session). SQLite's own locking still decides correctness; this
    only shortens the queue. Every connection opens the lock file itself, so threads of one
    process queue too (flock locks belong to the open file, not to the process)."""

    lock_path: Path  # set by _queued_writer
    in_process: threading.Lock  # one per database file, shared by this process's connections

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._turn = False

    def wait_for_turn(self, timeout: float = 30.0) -> None:
        if self._turn:
            return
        deadline = time.monotonic() + timeout
        # Threads of this process hand the turn over through a lock (no polling at all);
        # other processes through the flock.
        if not self.in_process.acquire(timeout=timeout):
            raise sqlite3.OperationalError(f"database is locked (no write turn in {timeout:g} s)")
        pause = 50e-6
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._turn = True
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.in_process.release()
                    raise sqlite3.OperationalError(
                        f"database is locked (no write turn in {timeout:g} s)"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 5e-4)

    def _done(self) -> None:
        if self._turn:
            self._turn = False
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                self.in_process.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._done()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._done()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._done()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


_turn_locks: dict[Path, threading.Lock] = {}


def _queued_writer(database: Path) -> type[_QueuedWriter]:
    lock_path = Path(f"{os.path.abspath(database)}.writelock")
    in_process = _turn_locks.setdefault(lock_path, threading.Lock())
    return type(
        "QueuedWriter", (_QueuedWriter,), {"lock_path": lock_path, "in_process": in_process}
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a 250 means the commit reached the disk
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose commit the caller owns; rolled back if the block raises."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str):
    from alembic.config import Config  # imported here: alembic is only needed to migrate

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    from alembic import command

    command.upgrade(alembic_config(url), "head")
