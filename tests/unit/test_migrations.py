"""The Alembic migrations build exactly the schema the models declare, on SQLite and PostgreSQL.

A fresh database is upgraded to head (models/migrations), then Alembic's autogenerate compares
what the database has with SQLModel.metadata: any table, column, index, unique constraint or
foreign key the models have and the migrations do not (or the other way round) is a diff. Types
are compared too (a String(64) migrated as String(32), a naive DateTime for an aware one), and
server defaults: the models declare none, so any the migrations create is drift as well.
"""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData
from sqlmodel import SQLModel

import models  # noqa: F401  (registers every table on SQLModel.metadata)
from models.db import make_engine, migrate

COMPARE = {"compare_type": True, "compare_server_default": True}


def _diffs(db_url: str, metadata: MetaData) -> list:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts=COMPARE), metadata)
    finally:
        engine.dispose()


def test_migrations_to_head_build_exactly_the_models_schema(db_url):
    migrate(db_url)
    diffs = _diffs(db_url, SQLModel.metadata)
    assert diffs == [], "migrations and models differ (add a migration):\n" + "\n".join(
        map(repr, diffs)
    )


def test_the_comparison_sees_the_migrated_tables(db_url):
    """Against empty metadata every migrated table is reported: the comparison above looked at
    the database the migrations wrote (on PostgreSQL, the test's own schema)."""
    migrate(db_url)
    removed = {d[1].name for d in _diffs(db_url, MetaData()) if d[0] == "remove_table"}
    assert removed == set(SQLModel.metadata.tables)
