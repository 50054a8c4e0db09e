"""The spool writer: group commit, and one bad entry never fails its neighbours."""

from __future__ import annotations

import asyncio

from sqlmodel import Session, func, select

from models import Message, Recipient, Tenant
from relay.spool import Spool, SpoolEntry, SpoolUnavailable, new_queue_id


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
