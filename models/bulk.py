"""Fixed statements for the hot write paths on SQLite, through the sqlite3 connection.

The spool commits a batch of messages every few milliseconds. Through SQLAlchemy Core each
batch cost ~0.44 ms of CPU, of which ~0.18 ms was SQLAlchemy building the execution (per
batch, however small); the write lock is held meanwhile. Here the statement is compiled once
per table and values pass through the same bind processors SQLAlchemy would apply, so the rows
stored are the same (tests/unit/test_spool.py and tests/unit/test_queue_fixed.py compare
them). The delivery engine's claims and outcomes use the same. PostgreSQL keeps SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Engine, Table, insert
from sqlalchemy.sql.base import Executable

from models.db import is_sqlite, wait_for_write_turn


class FixedStatement:
    """A statement compiled once for sqlite3 (qmark paramstyle). rows() turns dicts keyed by
    bind parameter name into tuples in the statement's order, through the bind processors
    SQLAlchemy would apply; a parameter missing from a dict takes its bound value (e.g. the
    None of `.values(lease_owner=None)`)."""

    def __init__(self, engine: Engine, statement: Executable):
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        if compiled.positiontup is None:  # a named paramstyle: not SQLite
            raise ValueError(f"{dialect.name}: FixedStatement is for SQLite's qmark paramstyle")
        self.sql = str(compiled)
        self._params = [
            (
                key,
                compiled.binds[key].type.dialect_impl(dialect).bind_processor(dialect),
                compiled.binds[key].value,
            )
            for key in compiled.positiontup
        ]

    def row(self, values: dict) -> tuple:
        out = []
        for key, process, default in self._params:
            value = values.get(key, default)
            out.append(process(value) if process is not None else value)
        return tuple(out)

    def rows(self, values: Sequence[dict]) -> list[tuple]:
        return [self.row(v) for v in values]


def fixed_insert(engine: Engine, table: Table) -> FixedStatement:
    """INSERT INTO table (every column) VALUES (?, …)."""
    return FixedStatement(engine, insert(table))


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
