"""models/db.py: a thread's second connection beside the write turn that thread holds (reads at
once, a write fails at once, never the 30 s wait for itself that stopped every writer on
7 December), and the diagnostics naming who holds a turn."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from models import db
from models.bulk import sqlite_write
from models.db import make_engine, session_scope

QUICK = 3.0  # seconds: far below the 30 s turn wait a self-deadlock took


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (who TEXT)"))
        conn.execute(text("INSERT INTO t VALUES ('committed')"))
    yield engine
    engine.dispose()


def _who(conn) -> list[str]:
    return conn.execute(text("SELECT who FROM t ORDER BY rowid")).scalars().all()


def test_a_read_beside_the_sessions_turn_runs_at_once_on_the_committed_state(sqlite_engine):
    started = time.monotonic()
    with session_scope(sqlite_engine) as session:
        session.execute(text("INSERT INTO t VALUES ('uncommitted')"))  # the turn is held
        with sqlite_engine.connect() as beside:  # e.g. a service handed the engine
            assert _who(beside) == ["committed"]  # as on PostgreSQL: not the open write
        session.execute(text("INSERT INTO t VALUES ('after')"))
        session.commit()
    assert time.monotonic() - started < QUICK
    with sqlite_engine.connect() as conn:
        assert _who(conn) == ["committed", "uncommitted", "after"]


def test_a_write_beside_the_sessions_turn_fails_at_once_saying_why(sqlite_engine):
    with session_scope(sqlite_engine) as session:
        session.execute(text("INSERT INTO t VALUES ('mine')"))
        started = time.monotonic()
        refused = pytest.raises(
            OperationalError, match="holds the write turn on another connection"
        )
        with refused, sqlite_engine.begin() as beside:
            beside.execute(text("INSERT INTO t VALUES ('beside')"))
        assert time.monotonic() - started < QUICK
        refused = pytest.raises(sqlite3.OperationalError, match="another connection")
        with refused, sqlite_write(sqlite_engine) as raw:  # the relay's raw write path
            raw.execute("INSERT INTO t VALUES ('raw')")
        session.commit()  # the session's own transaction is untouched
    with sqlite_engine.connect() as conn:
        assert _who(conn) == ["committed", "mine"]


def test_the_connection_that_read_beside_is_a_writer_again_afterwards(sqlite_engine):
    with session_scope(sqlite_engine) as session:
        session.execute(text("INSERT INTO t VALUES ('a')"))
        with sqlite_engine.connect() as beside:
            _who(beside)
            used = beside.connection.dbapi_connection
        session.commit()
    assert used.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert not used.beside_turn
    # other threads are not "beside": they queue for the turn as before
    order: list[str] = []
    with session_scope(sqlite_engine) as session:
        session.execute(text("INSERT INTO t VALUES ('first')"))
        other = threading.Thread(target=lambda: _write(sqlite_engine, "second", order))
        other.start()
        time.sleep(0.3)
        order.append("first commits")
        session.commit()
    other.join(10)
    assert order == ["first commits", "second"]


def _write(engine, who: str, order: list[str]) -> None:
    with engine.begin() as conn:
        order.append(who)
        conn.execute(text("INSERT INTO t VALUES (:who)"), {"who": who})


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(30)
"""


def test_a_waiter_that_gives_up_names_the_process_holding_the_turn(sqlite_engine, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "q.db.writelock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        raw = sqlite_engine.raw_connection()
        try:
            with pytest.raises(sqlite3.OperationalError) as failed:
                raw.dbapi_connection.wait_for_turn(timeout=0.3)
        finally:
            raw.close()
    finally:
        holder.kill()
        holder.wait()
    assert "no write turn in 0.3 s" in str(failed.value)
    assert f"held by pid {holder.pid} (" in str(failed.value)
    assert "import fcntl" in str(failed.value)  # its command line


def test_a_waiter_names_the_thread_of_its_own_process_and_where_it_is(sqlite_engine):
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with session_scope(sqlite_engine) as session:
            session.execute(text("INSERT INTO t VALUES ('held')"))
            inside.set()
            release.wait(10)  # stuck, as a transaction held across a slow call is
            session.commit()

    holder = threading.Thread(target=hold, name="slow-holder")
    holder.start()
    try:
        assert inside.wait(5)
        raw = sqlite_engine.raw_connection()
        try:
            with pytest.raises(sqlite3.OperationalError) as failed:
                raw.dbapi_connection.wait_for_turn(timeout=0.3)
        finally:
            raw.close()
    finally:
        release.set()
        holder.join(10)
    said = str(failed.value)
    assert "held by thread slow-holder of this process" in said
    assert "test_db_turn.py" in said and "hold" in said


def test_a_turn_held_for_seconds_is_logged_with_where_it_was_given_back(
    sqlite_engine, monkeypatch, caplog
):
    monkeypatch.setattr(db, "LONG_TURN_SECONDS", 0.2)
    with caplog.at_level(logging.WARNING, logger="axiom.db"):
        with session_scope(sqlite_engine) as session:
            session.execute(text("INSERT INTO t VALUES ('slow')"))
            time.sleep(0.3)
            session.commit()
        with sqlite_engine.begin() as conn:  # a short one says nothing
            conn.execute(text("INSERT INTO t VALUES ('quick')"))
    said = [r.getMessage() for r in caplog.records if r.name == "axiom.db"]
    assert len(said) == 1, said
    assert "SQLite write turn held 0." in said[0]
    assert "test_db_turn.py" in said[0]  # the caller that committed, not SQLAlchemy's frames
