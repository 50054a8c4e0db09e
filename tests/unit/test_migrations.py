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


# A replayed PostgreSQL schema (testbed/schema.py, what most database tests get) against one
# Alembic migrated: the same catalog, schema names aside.
_CATALOG = {
    "columns": """SELECT table_name, column_name, data_type, udt_name, is_nullable,
        character_maximum_length, numeric_precision, column_default
        FROM information_schema.columns WHERE table_schema = :s ORDER BY 1, 2""",
    "indexes": """SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = :s ORDER BY 1, 2""",
    "constraints": """SELECT conrelid::regclass::text, conname, contype,
        pg_get_constraintdef(c.oid) FROM pg_constraint c
        JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = :s ORDER BY 1, 2""",
    "enums": """SELECT t.typname, e.enumlabel, e.enumsortorder FROM pg_type t
        JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = :s ORDER BY 1, 3""",
    "sequences": """SELECT sequence_name, data_type, start_value, increment
        FROM information_schema.sequences WHERE sequence_schema = :s ORDER BY 1""",
}


def _catalog(url: str, schema: str) -> dict[str, list[tuple]]:
    from sqlalchemy import text

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            found = {
                name: [
                    tuple(str(v).replace(schema, "SCHEMA") for v in row)
                    for row in conn.execute(text(query), {"s": schema})
                ]
                for name, query in _CATALOG.items()
            }
            found["version"] = list(conn.execute(text("SELECT version_num FROM alembic_version")))
            return found
    finally:
        engine.dispose()


def test_a_replayed_postgresql_schema_equals_a_migrated_one(postgres_admin):
    import secrets

    from sqlalchemy import text

    from testbed import schema as testbed_schema
    from tests.conftest import _pg_schema_url

    names = [f"t_{secrets.token_hex(6)}" for _ in range(3)]
    with postgres_admin.connect() as conn:
        for name in names:
            conn.execute(text(f"CREATE SCHEMA {name}"))
    try:
        migrated, first, replayed = names
        migrate(_pg_schema_url(migrated))
        testbed_schema.migrate_new(_pg_schema_url(first))  # records, unless done before here
        assert testbed_schema._pg_statements, "nothing recorded: every schema is migrated"
        testbed_schema.migrate_new(_pg_schema_url(replayed))  # replays
        expected = _catalog(_pg_schema_url(migrated), migrated)
        assert len(expected["columns"]) > 100 and expected["enums"]
        assert _catalog(_pg_schema_url(replayed), replayed) == expected
        assert _catalog(_pg_schema_url(first), first) == expected
        # Run again on a schema holding tables, it leaves them to Alembic (nothing replayed).
        testbed_schema.migrate_new(_pg_schema_url(replayed))
        assert _catalog(_pg_schema_url(replayed), replayed) == expected
    finally:
        with postgres_admin.connect() as conn:
            for name in names:
                conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
