"""models/db.py: SQLite writers queue on a lock (threads) and an flock (processes)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from models.db import _QueuedWriter, make_engine


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (who TEXT, at REAL)"))
    yield engine
    engine.dispose()


def test_connections_are_queued_writers_with_a_lock_file_beside_the_database(
    sqlite_engine, tmp_path
):
    raw = sqlite_engine.raw_connection()
    try:
        assert isinstance(raw.dbapi_connection, _QueuedWriter)
        assert raw.dbapi_connection.lock_path == tmp_path / "q.db.writelock"
    finally:
        raw.close()
    assert (tmp_path / "q.db.writelock").exists()


def test_a_second_thread_writes_only_after_the_first_commits(sqlite_engine):
    order: list[str] = []
    first_in = threading.Event()

    def first():
        with sqlite_engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES ('first', 0)"))
            first_in.set()
            time.sleep(0.3)
            order.append("first commits")

    def second():
        first_in.wait(5)
        with sqlite_engine.begin() as conn:
            order.append("second begins")
            conn.execute(text("INSERT INTO t VALUES ('second', 0)"))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["first commits", "second begins"]
    with sqlite_engine.connect() as conn:
        assert conn.execute(text("SELECT who FROM t ORDER BY rowid")).scalars().all() == [
            "first",
            "second",
        ]


def test_a_failed_transaction_gives_the_turn_back(sqlite_engine):
    with pytest.raises(OperationalError), sqlite_engine.begin() as conn:
        conn.execute(text("INSERT INTO no_such_table VALUES (1)"))
    with sqlite_engine.begin() as conn:  # would wait forever if the turn were still held
        conn.execute(text("INSERT INTO t VALUES ('after', 0)"))


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_another_process_holding_the_turn_makes_us_wait_then_gives_locked(sqlite_engine, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "q.db.writelock"), "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        raw = sqlite_engine.raw_connection()
        try:
            writer = raw.dbapi_connection
            with pytest.raises(sqlite3.OperationalError, match=r"no write turn in 0.3 s"):
                writer.wait_for_turn(timeout=0.3)
            assert not writer.in_process.locked()  # the thread lock was given back too
        finally:
            raw.close()
    finally:
        holder.kill()
        holder.wait()
    with sqlite_engine.begin() as conn:  # the holder is gone: the kernel released its flock
        conn.execute(text("INSERT INTO t VALUES ('later', 0)"))
