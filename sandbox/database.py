"""Read the relay's database without getting in its way.

models/db.py opens every SQLite transaction with BEGIN IMMEDIATE so that the relay's writers
queue instead of failing; a poller doing the same would take the write lock every few seconds
and make spool commits wait behind it. On SQLite the sandbox reads in autocommit with
query_only set (WAL readers need no lock); PostgreSQL needs nothing special.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event

from models.db import normalise_url


def reader(url: str) -> Engine:
    url = normalise_url(url)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _read_only)
    return engine


def _read_only(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # no implicit BEGIN: each statement its own snapshot
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA query_only=ON")
    cur.close()
