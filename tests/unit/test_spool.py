"""The spool writer: group commit, and one bad entry never fails its neighbours."""

from __future__ import annotations

import asyncio

import pytest
from sqlmodel import Session, func, select

from models import Message, Recipient, Tenant
from relay.spool.writer import Spool, SpoolEntry, SpoolUnavailable, new_queue_id


def _entry(tenant_id: int, sender: str = "a@acme.example") -> SpoolEntry:
    qid = new_queue_id()
    return SpoolEntry(
        qid,
        tenant_id,
        "transactional",
        sender,
        ["b@example.org"],
        "acme.example",
        f"<{qid}@x>",
        b"From: a@acme.example\r\n\r\nhi\r\n",
        "127.0.0.1",
        None,
    )


def test_batch_with_one_bad_entry_commits_the_others(engine):
    with Session(engine) as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.commit()
        tenant_id = tenant.id
    spool = Spool(engine, batch_max=64)
    good = [_entry(tenant_id) for _ in range(10)]
    bad = _entry(tenant_id, sender="x" * 600)  # longer than the column allows on PostgreSQL
    bad.tenant_id = 999_999  # and no such tenant: a foreign-key violation on both backends

    async def submit_all():
        spool.start()
        try:
            return await asyncio.gather(
                *(spool.put(e) for e in [*good[:5], bad, *good[5:]]), return_exceptions=True
            )
        finally:
            spool.stop()

    results = asyncio.run(submit_all())
    assert isinstance(results[5], SpoolUnavailable)
    assert [r for i, r in enumerate(results) if i != 5] == [e.queue_id for e in good]
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(Message)).one() == 10
        assert s.exec(select(func.count()).select_from(Recipient)).one() == 10


def test_queue_ids_are_unique_time_sorted_and_differ_in_a_forked_child():
    import os

    ids = [new_queue_id(1_800_000_000.0) for _ in range(50_000)]
    assert len(set(ids)) == len(ids)  # same millisecond: the 80 random bits alone
    assert all(len(i) == 26 for i in ids)
    assert new_queue_id(1_800_000_000.0) < new_queue_id(1_800_000_000.002)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes its next id; the parent's PRNG state must not repeat
        os.write(write, new_queue_id(1_800_000_000.0).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read), os.close(write)
    assert child != new_queue_id(1_800_000_000.0)
    assert len(child) == 26


def test_sqlite_fixed_inserts_store_exactly_what_sqlalchemy_would(tmp_path):
    """models/bulk.py writes the spool through fixed sqlite3 statements: the stored rows must
    be byte for byte those SQLAlchemy Core stores for the same entries."""
    import sqlite3

    from sqlalchemy import insert

    from models.db import make_engine, migrate
    from relay.spool.writer import spool_rows

    engines = []
    for name in ("fixed", "core"):
        url = f"sqlite:///{tmp_path / name}.db"
        migrate(url)
        engines.append(make_engine(url))
    for engine in engines:
        with Session(engine) as s:
            s.add(Tenant(name="acme"))
            s.commit()
    entries = [_entry(1), _entry(1, sender="b@acme.example")]
    entries[1].recipients = ["c@example.org", "d@example.org"]
    entries[1].auth_user = "acme-app"
    Spool(engines[0])._commit(entries)  # the fixed statements
    messages, recipients = spool_rows(entries)
    with engines[1].begin() as conn:  # what Spool did before
        conn.execute(insert(Message), messages)
        conn.execute(insert(Recipient), recipients)

    def dump(path):
        with sqlite3.connect(path) as db:
            return (
                db.execute("SELECT * FROM message ORDER BY id").fetchall(),
                db.execute("SELECT * FROM recipient ORDER BY id").fetchall(),
                db.execute(
                    "SELECT typeof(created_at), typeof(data), typeof(size) FROM message"
                ).fetchall(),
            )

    fixed, core = dump(tmp_path / "fixed.db"), dump(tmp_path / "core.db")
    assert len(fixed[0]) == 2 and len(fixed[1]) == 3
    assert fixed == core
    for engine in engines:
        engine.dispose()


def test_a_failed_fixed_insert_rolls_back_and_gives_the_write_turn_back(tmp_path):
    import sqlite3

    from models.db import make_engine, migrate

    url = f"sqlite:///{tmp_path / 'axiom.db'}"
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.commit()
    spool = Spool(engine)
    first = _entry(1)
    spool._commit([first])
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        spool._commit([_entry(1), first])  # the second repeats a queue id: the batch fails
    spool._commit([_entry(1)])  # the turn was given back: the next commit goes through
    with Session(engine) as s:
        assert s.exec(select(func.count()).select_from(Message)).one() == 2
    engine.dispose()
