"""One engine per process, SQLite pragmas for a durable spool, and migrations to head."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc
from sqlmodel import Session

MIGRATIONS = Path(__file__).parent / "migrations"
WRITE_TURN_SECONDS = 30.0  # like busy_timeout: a stuck holder gives "database is locked"
LONG_TURN_SECONDS = 5.0  # a turn held longer is logged, with where it was given back
BUSY_TIMEOUT_MS = 30_000
BESIDE_TURN_BUSY_MS = 200  # a read beside this thread's own turn never waits for long

log = logging.getLogger("axiom.db")


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
        event.listen(engine, "handle_error", _explain_write_beside_turn)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


def _begin_immediate(conn) -> None:
    dbapi_conn = conn.connection.dbapi_connection
    if (
        isinstance(dbapi_conn, _QueuedWriter)
        and dbapi_conn.turn.owner is not None
        and dbapi_conn.turn_is_this_threads()
    ):
        # A second connection of a thread that holds the turn on its first (a service that
        # reads through the engine while its caller's session is open): waiting for the turn
        # would wait for this very thread — 30 s in which no process could write — and
        # SQLite itself lets a WAL reader run beside a writer. It reads, as on PostgreSQL,
        # the committed state; a write on it fails at once (_explain_write_beside_turn).
        dbapi_conn.begin_beside_turn()
        conn.exec_driver_sql("BEGIN")
        return
    wait_for_write_turn(dbapi_conn)
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _explain_write_beside_turn(context) -> None:
    """SQLite's "database is locked" on a connection beside its thread's own turn is no
    contention to wait out but the thread's other open transaction: say so."""
    conn = context.connection
    dbapi_conn = conn.connection.dbapi_connection if conn is not None else None
    if isinstance(dbapi_conn, _QueuedWriter) and dbapi_conn.beside_turn:
        original = context.original_exception
        if isinstance(original, sqlite3.OperationalError) and "locked" in str(original):
            raise exc.OperationalError(
                context.statement,
                context.parameters,
                sqlite3.OperationalError(f"{original}: {_BESIDE_TURN}"),
            ) from original


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
    turn: _Turn  # one per database file, shared by this process's connections
    in_process: threading.Lock  # turn.lock

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._turn = False
        self.beside_turn = False  # a read transaction beside this thread's own turn

    def turn_is_this_threads(self) -> bool:
        """This thread holds the turn, on another connection of this process."""
        return not self._turn and self.turn.owner == threading.get_ident()

    def wait_for_turn(self, timeout: float = WRITE_TURN_SECONDS) -> None:
        if self._turn:
            return
        deadline = time.monotonic() + timeout
        # Threads of this process hand the turn over through a lock (no polling at all);
        # other processes through the flock.
        if not self.in_process.acquire(blocking=False):
            if self.turn_is_this_threads():  # it would wait for itself
                raise sqlite3.OperationalError(f"database is locked: {_BESIDE_TURN}")
            if not self.in_process.acquire(timeout=timeout):
                raise sqlite3.OperationalError(self._no_turn(timeout))
        self.turn.owner = threading.get_ident()
        pause = 50e-6
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._turn = True
                self.turn.since = time.monotonic()
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.turn.owner = None
                    self.in_process.release()
                    raise sqlite3.OperationalError(self._no_turn(timeout)) from None
                time.sleep(pause)
                pause = min(pause * 2, 5e-4)

    def begin_beside_turn(self) -> None:
        """The next transaction only reads, beside the turn its thread holds (see
        _begin_immediate): it must not wait on SQLite's lock, which that thread holds."""
        self.execute(f"PRAGMA busy_timeout={BESIDE_TURN_BUSY_MS}")
        self.beside_turn = True

    def _done(self) -> None:
        if self._turn:
            held = time.monotonic() - self.turn.since
            self._turn = False
            self.turn.owner = None
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                self.in_process.release()
            if held > LONG_TURN_SECONDS:
                _log_long_turn(held)
        elif self.beside_turn:
            self.beside_turn = False
            self.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # a writer's again

    def _no_turn(self, timeout: float) -> str:
        """The waiter's error, naming who holds the turn: what the holder's own log cannot
        say while it is stuck (only read when the wait failed)."""
        return f"database is locked (no write turn in {timeout:g} s; {_holders(self)})"

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
        self.beside_turn = False  # nothing to restore on a closed connection
        try:
            super().close()
        finally:
            self._done()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


class _Turn:
    """This process's part of one database's write turn: the lock its threads hand the turn
    over with, which thread holds it (a second connection of that thread must not wait for
    it) and since when."""

    __slots__ = ("lock", "owner", "since")

    def __init__(self):
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.since = 0.0


_BESIDE_TURN = (
    "this thread holds the write turn on another connection (a transaction opened inside "
    "another one): on SQLite a connection beside it can read, not write; write on the open "
    "session's own connection (session.connection()), or after its commit"
)

_turns: dict[Path, _Turn] = {}


def _queued_writer(database: Path) -> type[_QueuedWriter]:
    lock_path = Path(f"{os.path.abspath(database)}.writelock")
    turn = _turns.setdefault(lock_path, _Turn())
    return type(
        "QueuedWriter",
        (_QueuedWriter,),
        {"lock_path": lock_path, "turn": turn, "in_process": turn.lock},
    )


def _holders(conn: _QueuedWriter) -> str:
    """Who holds the turn: a thread of this process (and where it is now), the processes
    holding the flock (from /proc/locks, Linux)."""
    said = []
    owner = conn.turn.owner
    if owner is not None:
        thread = next((t.name for t in threading.enumerate() if t.ident == owner), str(owner))
        frame = sys._current_frames().get(owner)
        said.append(f"thread {thread} of this process, now at {_where(frame, 12)}")
    try:
        inode = os.fstat(conn._lock_fd).st_ino
        with open("/proc/locks") as locks:
            pids = [
                fields[4]
                for fields in (line.split() for line in locks)
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}")
            ]
        said += [f"pid {pid} ({_command(pid)})" for pid in pids if int(pid) != os.getpid()]
    except (OSError, ValueError):
        pass
    return "held by " + ", ".join(said) if said else "holder unknown"


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def _where(frame, depth: int, *, skip: tuple[str, ...] = ()) -> str:
    """Frames of a stack as file:line function, innermost first, leaving out those whose
    file path contains one of `skip` (no source is read)."""
    steps = []
    while frame is not None and len(steps) < depth:
        code = frame.f_code
        if not any(part in code.co_filename for part in skip):
            steps.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(steps) or "?"


_LIBRARIES = (os.sep + "sqlalchemy" + os.sep, os.sep + "sqlmodel" + os.sep, "contextlib", __file__)


def _log_long_turn(held: float) -> None:
    """A turn held for seconds stopped every writer of every process meanwhile (the relay's
    spool among them): say where it was given back. Costs nothing below the threshold."""
    log.warning(
        "SQLite write turn held %.1f s by pid %d thread %s; given back at %s",
        held,
        os.getpid(),
        threading.current_thread().name,
        _where(sys._getframe(1), 8, skip=_LIBRARIES),
    )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a 250 means the commit reached the disk
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
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
