"""Fixed INSERT statements for the hot write paths on SQLite, through the sqlite3 connection.

The spool commits a batch of messages every few milliseconds. Through SQLAlchemy Core each
batch cost ~0.44 ms of CPU, of which ~0.18 ms was SQLAlchemy building the execution (per
batch, however small); the write lock is held meanwhile. Here the statement is compiled once
per table and values pass through the same bind processors SQLAlchemy would apply, so the rows
stored are the same (tests/unit/test_spool.py compares them). PostgreSQL keeps SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Engine, Table, insert

from models.db import is_sqlite, wait_for_write_turn


class FixedInsert:
    """INSERT INTO table (every column) VALUES (?, …), for executemany on sqlite3."""

    def __init__(self, engine: Engine, table: Table):
        dialect = engine.dialect
        compiled = insert(table).compile(dialect=dialect)
        if compiled.positiontup is None:  # a named paramstyle: not SQLite
            raise ValueError(f"{dialect.name}: FixedInsert is for SQLite's qmark paramstyle")
        self.sql = str(compiled)
        self._keys = list(compiled.positiontup)
        self._processors = [
            table.c[key].type.dialect_impl(dialect).bind_processor(dialect) for key in self._keys
        ]

    def rows(self, values: Sequence[dict]) -> list[tuple]:
        pairs = list(zip(self._keys, self._processors, strict=True))
        return [
            tuple(p(row.get(k)) if p is not None else row.get(k) for k, p in pairs)
            for row in values
        ]


@contextmanager
def sqlite_write(engine: Engine) -> Iterator[sqlite3.Connection]:
    """A write transaction on the pooled sqlite3 connection: the same write turn and BEGIN
    IMMEDIATE as engine.begin() (models/db.py), committed when the block ends, rolled back
    (and the turn given back) if it raises."""
    if not is_sqlite(engine):
        raise ValueError("sqlite_write needs a SQLite engine")
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        wait_for_write_turn(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
    finally:
        raw.close()
