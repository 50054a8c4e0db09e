"""The delivery side of the spool: claim due recipients under a lease, record what happened.

A claim sets lease_owner/lease_expires_at; a live worker renews the leases of what it is still
working on, a worker that dies simply lets its leases run out and another worker claims the
recipient again (at-least-once). On PostgreSQL the claim uses
FOR UPDATE SKIP LOCKED so several delivery processes share one spool without claiming the same
row; SQLite serialises writers with BEGIN IMMEDIATE. Outcomes are written only while the
writer still holds the lease, so a worker that lost its lease cannot overwrite newer state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, bindparam, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from models import (
    DeliveryEvent,
    EventKind,
    HoldReason,
    HoldTally,
    Message,
    Recipient,
    RecipientState,
    Suppression,
    Tenant,
    WarmupDay,
)
from models.audit_trail import record
from models.bulk import FixedStatement, sqlite_write
from models.db import is_sqlite
from relay.spool.writer import SpoolEntry, spool_rows


@dataclass(frozen=True)
class Claim:
    recipient_id: int
    message_id: str
    address: str
    domain: str
    attempts: int


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    tenant_id: int
    stream: str
    mail_from: str
    data: bytes
    created_at: datetime
    from_domain: str = ""  # the header From's domain (DMARC's), as events record it
    # Read with the message, not cached: a pause holds the tenant's mail from the next claim,
    # and a resume releases it as soon as the woken recipients fall due.
    tenant_paused: bool = False
    # The customer marked it for an engaged recipient (runbooks/ip-warmup.yaml
    # candidate_header): warming IPs prefer it (relay/delivery/egress.py).
    warmup_candidate: bool = False


# The last_reply of a recipient postponed because its tenant is paused (`axiom queue` shows it).
TENANT_PAUSED_WAIT = "waiting: sending for this tenant is paused by the operator"


@dataclass
class Attempt:
    """One recipient's result of one attempt, as the delivery event will record it."""

    claim: Claim
    category: str
    permanent: bool
    action: str | None = None
    reply_code: int | None = None
    enhanced_code: str | None = None
    reply_text: str | None = None
    source_ip: str | None = None
    provider: str | None = None
    mx_host: str | None = None
    latency_ms: int | None = None

    @property
    def reply(self) -> str:
        text = self.reply_text or ""
        # Most replies already carry their enhanced code in the text; say it once.
        enhanced = (
            ""
            if (self.enhanced_code and text.startswith(self.enhanced_code))
            else self.enhanced_code
        )
        parts = [str(self.reply_code or ""), enhanced or "", text]
        return " ".join(p for p in parts if p)[:1000]


@dataclass(frozen=True)
class Hold:
    """Why a job's recipients were postponed without an attempt, as the hold tally counts it."""

    reason: HoldReason
    provider: str = ""
    source_ip: str = ""


@dataclass
class Settlement:
    """Everything one delivery job changes, committed in one transaction. One job is one
    message to one domain: its events carry the message's tenant, stream and From domain."""

    tenant_id: int | None = None
    stream: str | None = None
    from_domain: str | None = None
    delivered: list[Attempt] = field(default_factory=list)
    deferred: list[tuple[Attempt, datetime]] = field(default_factory=list)
    failed: list[tuple[Attempt, RecipientState]] = field(default_factory=list)  # bounced/expired
    # Not attempted (every source IP capped or suspended): back to the queue, no attempt counted.
    postponed: list[tuple[Claim, datetime, str]] = field(default_factory=list)
    hold: Hold | None = None  # why the postponed were not sent (None: not tallied)
    suppress: list[tuple[int, str, str]] = field(default_factory=list)  # tenant, address, reason
    dsns: list[SpoolEntry] = field(default_factory=list)
    warmup_sent: list[tuple[int, int]] = field(default_factory=list)  # (warmup day id, count)


def claim_due(
    engine: Engine,
    owner: str,
    now: datetime,
    lease_seconds: int,
    limit: int,
    *,
    fixed_statements: bool = True,
) -> list[Claim]:
    """Lease up to limit due recipients to owner. On SQLite through one fixed statement
    (models/bulk.py); fixed_statements=False sends SQLAlchemy's own (tests compare them)."""
    params = {
        "b_state": RecipientState.queued,
        "b_now": now,
        "b_limit": limit,
        "b_owner": owner,
        "b_until": now + timedelta(seconds=lease_seconds),
    }
    if fixed_statements and is_sqlite(engine):
        claim = _fixed(engine, "claim", _claim_statement)
        with sqlite_write(engine) as conn:
            rows = conn.execute(claim.sql, claim.row(params)).fetchall()
    else:
        with engine.begin() as conn:
            rows = conn.execute(_claim_statement(skip_locked=not is_sqlite(engine)), params).all()
    return [Claim(*row) for row in rows]


def _claim_statement(*, skip_locked: bool = False):
    """UPDATE … RETURNING that leases the due recipients; skip_locked on PostgreSQL, so
    several delivery processes claim different rows without waiting for each other."""
    due = (
        select(Recipient.id)
        .where(
            Recipient.state == bindparam("b_state"),
            Recipient.next_attempt_at <= bindparam("b_now"),
            or_(
                Recipient.lease_expires_at.is_(None),
                Recipient.lease_expires_at < bindparam("b_now"),
            ),
        )
        .order_by(Recipient.next_attempt_at)
        .limit(bindparam("b_limit"))
    )
    if skip_locked:
        due = due.with_for_update(skip_locked=True)
    return (
        update(Recipient)
        .where(Recipient.id.in_(due.scalar_subquery()))
        .values(lease_owner=bindparam("b_owner"), lease_expires_at=bindparam("b_until"))
        .returning(
            Recipient.id,
            Recipient.message_id,
            Recipient.address,
            Recipient.domain,
            Recipient.attempts,
        )
    )


_fixed_statements: dict[tuple[str, str], FixedStatement] = {}


def _fixed(engine: Engine, name: str, build) -> FixedStatement:
    key = (name, engine.dialect.name)
    fixed = _fixed_statements.get(key)
    if fixed is None:
        fixed = _fixed_statements[key] = FixedStatement(engine, build())
    return fixed


def renew_leases(
    engine: Engine, owner: str, recipient_ids: list[int], now: datetime, lease_seconds: int
) -> int:
    """Extend the leases owner still holds on recipient_ids (a lease lost meanwhile stays lost).

    On PostgreSQL rows locked by a settle() in progress are skipped, not waited for: they are
    being released anyway, and waiting could deadlock with that transaction."""
    renewed = 0
    with engine.begin() as conn:
        for start in range(0, len(recipient_ids), 500):
            held = select(Recipient.id).where(
                Recipient.id.in_(recipient_ids[start : start + 500]),
                Recipient.lease_owner == owner,
            )
            if not is_sqlite(engine):
                held = held.with_for_update(skip_locked=True)
            renewed += conn.execute(
                update(Recipient)
                .where(Recipient.id.in_(held.scalar_subquery()))
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            ).rowcount
    return renewed


_LOADED = (
    Message.id,
    Message.tenant_id,
    Message.stream,
    Message.mail_from,
    Message.data,
    Message.created_at,
    Message.header_from_domain,
    Tenant.paused,
    Message.warmup_candidate,
)


def load_messages(
    engine: Engine, ids: set[str], *, fixed_statements: bool = True
) -> dict[str, QueuedMessage]:
    """The claimed messages, each with whether its tenant is paused now. On SQLite one fixed
    statement read in autocommit: a read needs no write turn (engine.connect() would begin
    with models/db.py's BEGIN IMMEDIATE and queue behind every spool commit of every relay
    process, then hold the write lock while it reads). fixed_statements=False sends
    SQLAlchemy's own (tests compare them)."""
    if not ids:
        return {}
    if fixed_statements and is_sqlite(engine):
        return _load_sqlite(engine, ids)
    stmt = select(*_LOADED).join(Tenant, Tenant.id == Message.tenant_id).where(Message.id.in_(ids))
    with engine.connect() as conn:
        return {row[0]: QueuedMessage(*row) for row in conn.execute(stmt)}


class _FixedRead:
    """SELECT of _LOADED for the ids in one JSON array parameter (SQLite's json_each), so one
    statement text serves every batch size; each column goes through the result processor
    SQLAlchemy would apply (created_at to a datetime, paused to a bool)."""

    def __init__(self, engine: Engine):
        dialect = engine.dialect
        joined = select(*_LOADED).join(Tenant, Tenant.id == Message.tenant_id)
        self.sql = (
            f"{joined.compile(dialect=dialect)} "
            f"WHERE {Message.__tablename__}.id IN (SELECT value FROM json_each(?))"
        )
        self._processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in _LOADED
        ]

    def messages(self, raw_rows) -> dict[str, QueuedMessage]:
        processors = self._processors
        out = {}
        for raw in raw_rows:
            row = [v if p is None else p(v) for p, v in zip(processors, raw, strict=True)]
            out[row[0]] = QueuedMessage(*row)
        return out


_fixed_reads: dict[str, _FixedRead] = {}


def _load_sqlite(engine: Engine, ids: set[str]) -> dict[str, QueuedMessage]:
    read = _fixed_reads.get(engine.dialect.name)
    if read is None:
        read = _fixed_reads[engine.dialect.name] = _FixedRead(engine)
    raw = engine.raw_connection()  # autocommit (models/db.py): the SELECT alone, no lock
    try:
        cursor = raw.driver_connection.execute(read.sql, (json.dumps(sorted(ids)),))
        try:
            return read.messages(cursor.fetchall())
        finally:
            cursor.close()
    finally:
        raw.close()


def add_suppression(
    session,
    *,
    tenant_id: int,
    address: str,
    reason: str,
    source: str,
    actor: str,
    at: datetime,
    evidence: dict | None = None,
) -> bool:
    """Put address on the tenant's suppression list unless it is there already; an address
    added is audited (suppression.add) in the caller's transaction. True when added."""
    values = {
        "tenant_id": tenant_id,
        "address": address.lower(),
        "reason": reason[:255],
        "source": source,
        "created_at": at,
    }
    dialect_insert = sqlite_insert if is_sqlite(session.get_bind()) else pg_insert
    # RETURNING tells whether a row went in: SQLAlchemy adds RETURNING to this insert on
    # PostgreSQL by itself, and rowcount is then -1 (true) even when the row was there.
    stmt = dialect_insert(Suppression).values(**values).on_conflict_do_nothing()
    inserted = session.connection().execute(stmt.returning(Suppression.id)).first() is not None
    if inserted:
        record(
            session,
            actor=actor,
            action="suppression.add",
            subject=f"recipient:{address.lower()}",
            evidence={"tenant_id": tenant_id, "reason": reason} | (evidence or {}),
            at=at,
        )
    return inserted


def _release_held(**columns):
    """UPDATE of a recipient whose lease the writer still holds, giving the lease back; the
    values come as bind parameters (b_id, b_owner and those named in columns)."""
    return (
        update(Recipient)
        .where(Recipient.id == bindparam("b_id"), Recipient.lease_owner == bindparam("b_owner"))
        .values(lease_owner=None, lease_expires_at=None, **columns)
    )


# One statement each, executed with many parameter sets: a batch of outcomes costs one
# statement compilation and one round of executemany, not one ORM update per recipient.
_FINISH = _release_held(
    state=bindparam("b_state"),
    attempts=bindparam("b_attempts"),
    last_reply=bindparam("b_reply"),
    updated_at=bindparam("b_now"),
)
_DEFER = _release_held(
    attempts=bindparam("b_attempts"),
    next_attempt_at=bindparam("b_when"),
    last_reply=bindparam("b_reply"),
    updated_at=bindparam("b_now"),
)
_POSTPONE = _release_held(next_attempt_at=bindparam("b_when"), last_reply=bindparam("b_reply"))
_INSERT_EVENT = insert(DeliveryEvent)
# How long one row of the hold tally counts (runbooks read 15-minute windows and longer).
TALLY_INTERVAL_SECONDS = 900


def tally_statement(dialect_insert):
    """INSERT … ON CONFLICT DO UPDATE that adds b_count to the (interval, reason, subject) row
    of the hold tally; dialect_insert is SQLite's or PostgreSQL's insert."""
    stmt = dialect_insert(HoldTally).values(
        interval_start=bindparam("b_interval"),
        reason=bindparam("b_reason"),
        tenant_id=bindparam("b_tenant"),
        stream=bindparam("b_stream"),
        provider=bindparam("b_provider"),
        source_ip=bindparam("b_ip"),
        count=bindparam("b_count"),
        last_detail=bindparam("b_detail"),
    )
    return stmt.on_conflict_do_update(
        index_elements=["interval_start", "reason", "tenant_id", "stream", "provider", "source_ip"],
        set_={
            "count": HoldTally.count + stmt.excluded["count"],
            "last_detail": stmt.excluded["last_detail"],
        },
    )


def interval_start(now: datetime) -> datetime:
    epoch = int(now.timestamp())
    return datetime.fromtimestamp(epoch - epoch % TALLY_INTERVAL_SECONDS, tz=UTC)


def _tally_rows(batch: list[tuple[datetime, Settlement]]) -> list[dict]:
    """One row per (interval, reason, subject) of the batch's postponements, counts summed."""
    rows: dict[tuple, dict] = {}
    for now, outcome in batch:
        if outcome.hold is None or not outcome.postponed or outcome.tenant_id is None:
            continue
        hold = outcome.hold
        key = (
            interval_start(now),
            str(hold.reason),
            outcome.tenant_id,
            outcome.stream or "",
            hold.provider,
            hold.source_ip,
        )
        row = rows.get(key)
        if row is None:
            row = rows[key] = dict(
                zip(
                    ("b_interval", "b_reason", "b_tenant", "b_stream", "b_provider", "b_ip"),
                    key,
                    strict=True,
                )
            )
            row["b_count"] = 0
        row["b_count"] += len(outcome.postponed)
        row["b_detail"] = outcome.postponed[-1][2][:500]
    return list(rows.values())


def _event_row(now: datetime, outcome: Settlement, a: Attempt) -> dict:
    return {
        "at": now,
        "kind": EventKind.attempt,
        "tenant_id": outcome.tenant_id,
        "stream": outcome.stream,
        "from_domain": outcome.from_domain,
        "message_id": a.claim.message_id,
        "recipient_id": a.claim.recipient_id,
        "recipient": a.claim.address,
        "attempt": a.claim.attempts + 1,
        "source_ip": a.source_ip,
        "provider": a.provider,
        "mx_host": a.mx_host,
        "reply_code": a.reply_code,
        "enhanced_code": a.enhanced_code,
        "reply_text": (a.reply_text or "")[:2000] or None,
        "category": a.category,
        "permanent": a.permanent,
        "action": a.action,
        "latency_ms": a.latency_ms,
    }


def settle(engine: Engine, owner: str, now: datetime, outcome: Settlement) -> None:
    """Write one job's outcome; recipients whose lease was lost are left untouched."""
    settle_many(engine, owner, [(now, outcome)])


def settle_many(
    engine: Engine,
    owner: str,
    batch: list[tuple[datetime, Settlement]],
    *,
    fixed_statements: bool = True,
) -> None:
    """Write several jobs' outcomes in one transaction (relay/settler.py groups them).
    fixed_statements=False: SQLAlchemy's statements on SQLite too (tests compare them)."""
    from sqlmodel import Session

    finish, defer, postpone, events = [], [], [], []
    for now, outcome in batch:
        for attempt in outcome.delivered:
            finish.append(_finished(owner, now, attempt, RecipientState.delivered, 1))
            events.append(_event_row(now, outcome, attempt))
        for attempt, state in outcome.failed:
            bounced = state == RecipientState.bounced
            finish.append(_finished(owner, now, attempt, state, int(bounced)))
            events.append(_event_row(now, outcome, attempt))
        for attempt, when in outcome.deferred:
            defer.append(
                {
                    "b_id": attempt.claim.recipient_id,
                    "b_owner": owner,
                    "b_attempts": attempt.claim.attempts + 1,
                    "b_when": when,
                    "b_reply": attempt.reply,
                    "b_now": now,
                }
            )
            events.append(_event_row(now, outcome, attempt))
        for claim, when, reason in outcome.postponed:
            postpone.append(
                {
                    "b_id": claim.recipient_id,
                    "b_owner": owner,
                    "b_when": when,
                    "b_reply": reason[:1000],
                }
            )
    tallies = _tally_rows(batch)
    common = not any(o.suppress or o.dsns or o.warmup_sent for _, o in batch)
    if fixed_statements and common and is_sqlite(engine):
        # The common batch (deliveries, deferrals, postponements): fixed statements
        # (models/bulk.py) on the sqlite3 connection, the same rows SQLAlchemy would write.
        with sqlite_write(engine) as conn:
            for name, statement, rows in (
                ("finish", _FINISH, finish),
                ("defer", _DEFER, defer),
                ("postpone", _POSTPONE, postpone),
                ("event", _INSERT_EVENT, events),
                ("tally", _SQLITE_TALLY, tallies),
            ):
                if rows:
                    fixed = _fixed(engine, name, lambda statement=statement: statement)
                    conn.executemany(fixed.sql, fixed.rows(rows))
        return
    with Session(engine) as session:
        conn = session.connection()
        for statement, rows in ((_FINISH, finish), (_DEFER, defer), (_POSTPONE, postpone)):
            if rows:
                conn.execute(statement, rows)
        if events:
            conn.execute(insert(DeliveryEvent), events)
        if tallies:
            dialect_insert = sqlite_insert if is_sqlite(engine) else pg_insert
            conn.execute(tally_statement(dialect_insert), tallies)
        for now, outcome in batch:
            for tenant_id, address, reason in outcome.suppress:
                add_suppression(
                    session,
                    tenant_id=tenant_id,
                    address=address,
                    reason=reason,
                    source="bounce",
                    actor="relay:bounce",
                    at=now,
                )
            if outcome.dsns:
                messages, recipients = spool_rows(outcome.dsns)
                conn.execute(insert(Message), messages)
                conn.execute(insert(Recipient), recipients)
            for day_id, count in outcome.warmup_sent:
                conn.execute(
                    update(WarmupDay)
                    .where(WarmupDay.id == day_id)
                    .values(sent=WarmupDay.sent + count)
                )
        session.commit()


_SQLITE_TALLY = tally_statement(sqlite_insert)


def _finished(owner: str, now: datetime, attempt: Attempt, state, counted: int) -> dict:
    return {
        "b_id": attempt.claim.recipient_id,
        "b_owner": owner,
        "b_state": state,
        "b_attempts": attempt.claim.attempts + counted,
        "b_reply": attempt.reply,
        "b_now": now,
    }
