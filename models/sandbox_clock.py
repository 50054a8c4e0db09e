"""The sandbox clock's shared offset (one row), and the factory every process takes its clock from.

Why a table and not a file under AXIOM_HOME: the relay, its delivery nodes, the simulated world,
the flows and the CLI share only the database (DESIGN.md, "Processes"); with PostgreSQL the
delivery nodes need not share a disk. Reading it costs one primary-key SELECT per process per
second (config/clock.py, OffsetClock), off the relay's event loop.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, text
from sqlmodel import Field, SQLModel

from config.clock import Clock, OffsetClock, SystemClock
from models.base import created_at_field

CLOCK_ROW = 1
_SQL = "SELECT offset_seconds FROM sandbox_clock WHERE id = 1"
_READ = text(_SQL)


class SandboxClock(SQLModel, table=True):
    __tablename__ = "sandbox_clock"

    id: int = Field(default=CLOCK_ROW, primary_key=True)
    offset_seconds: float = 0.0  # how far the sandbox's time runs ahead of the system clock
    changed_at: datetime = created_at_field()  # system time of the last change


def read_offset(engine: Engine) -> float:
    """Seconds the sandbox clock runs ahead (0 when the row was never written).

    On SQLite the read goes straight to the pooled sqlite3 connection, which is in autocommit
    (models/db.py): a lone SELECT that sees committed data and takes no lock. Through
    engine.connect() it began with models/db.py's BEGIN IMMEDIATE, i.e. queued for the write
    lock behind every spool commit and claim, once a second in every relay process, and held
    the lock itself meanwhile, with every writer of every process waiting behind it."""
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()
        try:
            cursor = raw.driver_connection.execute(_SQL)
            try:
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            raw.close()
        return float(row[0] if row is not None and row[0] is not None else 0.0)
    with engine.connect() as conn:
        value = conn.execute(_READ).scalar()
    return float(value or 0.0)


def set_offset(engine: Engine, seconds: float) -> float:
    """Put the sandbox clock `seconds` ahead of the system clock; returns the new offset."""
    from sqlmodel import Session

    with Session(engine) as session:
        row = session.get(SandboxClock, CLOCK_ROW)
        if row is None:
            row = SandboxClock(id=CLOCK_ROW)
        row.offset_seconds = float(seconds)
        row.changed_at = datetime.now(UTC)
        session.add(row)
        session.commit()
    return float(seconds)


def clock_for(environment: str, engine: Engine) -> Clock:
    """The clock a process runs on: the system clock in production, which nothing can move;
    in the sandbox, the system clock plus the offset `axiom sandbox clock advance` sets."""
    if environment == "sandbox":
        return OffsetClock(lambda: read_offset(engine))
    return SystemClock()
