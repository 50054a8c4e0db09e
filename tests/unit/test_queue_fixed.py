"""On SQLite the delivery engine claims and settles through fixed sqlite3 statements
(models/bulk.py). Two identical spools, one worked through them and one through SQLAlchemy's
statements, must end byte for byte the same."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from models import HoldReason, RecipientState, Tenant
from models.db import make_engine, migrate
from relay.spool.claims import Attempt, Hold, Settlement, claim_due, settle_many
from relay.spool.writer import Spool, SpoolEntry

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _spool(tmp_path, name: str):
    url = f"sqlite:///{tmp_path / name}.db"
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as s:
        s.add(Tenant(name="acme"))
        s.commit()
    entries = []
    for i in range(6):
        entry = SpoolEntry(
            f"01QUEUEID{i:017d}",
            1,
            "transactional",
            "shop@acme.example",
            [f"r{i}a@example.org", f"r{i}b@example.net"],
            "acme.example",
            f"<{i}@acme.example>",
            b"From: shop@acme.example\r\n\r\nhi\r\n",
            "127.0.0.1",
            None,
            created_at=NOW - timedelta(minutes=10 - i),  # some due later than NOW below
        )
        entries.append(entry)
    Spool(engine)._commit(entries)
    return engine, tmp_path / f"{name}.db"


def _dump(path) -> list:
    with sqlite3.connect(path) as db:
        return [
            db.execute("SELECT * FROM recipient ORDER BY id").fetchall(),
            db.execute("SELECT * FROM deliveryevent ORDER BY id").fetchall(),
            db.execute("SELECT * FROM hold_tally ORDER BY id").fetchall(),
        ]


def _work(engine, *, fixed: bool) -> list:
    claims = []
    # Two claimers; the second finds only what the first left; a lease that expired is taken.
    claims.append(claim_due(engine, "node-a", NOW, 300, 5, fixed_statements=fixed))
    claims.append(claim_due(engine, "node-b", NOW, 300, 50, fixed_statements=fixed))
    later = NOW + timedelta(minutes=6)  # node-a's leases have run out
    claims.append(claim_due(engine, "node-c", later, 300, 2, fixed_statements=fixed))
    first = claims[0]
    outcome = Settlement(
        1,
        "transactional",
        "acme.example",
        delivered=[
            Attempt(first[0], "delivered", False, None, 250, "2.0.0", "ok", "127.0.0.1", "gmail")
        ],
        deferred=[(Attempt(first[1], "rate_limited", False, "retry", 421, "4.7.28"), later)],
        failed=[
            (Attempt(first[2], "mailbox_unknown", True, "suppress", 550), RecipientState.bounced)
        ],
        postponed=[(first[3], later, "every source IP capped")],
        hold=Hold(HoldReason.capped, "google"),
    )
    # The same subject in the same interval, from another job: one tally row counts both.
    again = Settlement(
        1,
        "transactional",
        postponed=[(first[4], later, "every source IP capped")],
        hold=Hold(HoldReason.capped, "google"),
    )
    # node-a's leases were taken over by node-c: only the ones it still holds are written.
    settle_many(engine, "node-a", [(later, outcome), (later, again)], fixed_statements=fixed)
    mine = claims[1]
    settle_many(
        engine,
        "node-b",
        [(NOW, Settlement(delivered=[Attempt(c, "delivered", False) for c in mine]))],
        fixed_statements=fixed,
    )
    return claims


def test_fixed_claims_and_settlements_equal_sqlalchemys(tmp_path):
    fixed_engine, fixed_path = _spool(tmp_path, "fixed")
    core_engine, core_path = _spool(tmp_path, "core")
    assert _dump(fixed_path) == _dump(core_path)
    fixed_claims = _work(fixed_engine, fixed=True)
    core_claims = _work(core_engine, fixed=False)
    assert fixed_claims == core_claims
    assert [len(c) for c in fixed_claims] == [5, 7, 2]
    fixed_dump, core_dump = _dump(fixed_path), _dump(core_path)
    assert fixed_dump == core_dump
    states = sorted({row[4] for row in fixed_dump[0]})  # recipient.state
    assert states == ["bounced", "delivered", "queued"]
    assert len(fixed_dump[1]) > 7  # delivery events written
    with sqlite3.connect(fixed_path) as db:
        first_job = db.execute(
            "SELECT kind, tenant_id, stream, from_domain, attempt FROM deliveryevent"
            " WHERE tenant_id IS NOT NULL ORDER BY id"
        ).fetchall()
    # The first job's delivered, deferred and bounced recipients, each on its first attempt.
    assert first_job == [("attempt", 1, "transactional", "acme.example", 1)] * 3
    [tally] = fixed_dump[2]  # one row: (interval, capped, tenant 1, transactional, google, "")
    assert tally[2:8] == ("capped", 1, "transactional", "google", "", 2), tally
    fixed_engine.dispose()
    core_engine.dispose()
