"""The durable spool: group-committed writes so a 250 always follows a disk commit.

One writer thread (relay/group_commit.py) drains submissions and commits them together: one
fsync covers every message in the batch, which is how a relay with synchronous=FULL keeps up
with many concurrent sessions. A message whose commit fails raises SpoolUnavailable, and the
SMTP handler turns that into 451 4.3.0; nothing is half-stored because message and
recipients go in the same transaction.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, insert

from config.clock import Clock, SystemClock
from models import Message, Recipient, RecipientState
from models.bulk import fixed_insert, sqlite_write
from models.db import is_sqlite
from relay.spool.group_commit import GroupCommitter

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Queue ids must be unique, not secret: a PRNG seeded from the OS per process (and again in a
# forked child) instead of one getrandom() system call per message, which was ~6 % of the
# event loop's time. 80 random bits per millisecond keep collisions out of reach.
_random = random.Random(secrets.randbits(128))
os.register_at_fork(after_in_child=lambda: _random.seed(secrets.randbits(128)))


def new_queue_id(now: float | None = None, rng: random.Random | None = None) -> str:
    """A 26-character, time-sortable id (ULID layout): 48-bit ms timestamp + 80 random bits.
    A seeded `rng` makes the sequence reproducible (the sandbox experiment's runs)."""
    value = (int((now or time.time()) * 1000) << 80) | (rng or _random).getrandbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


@dataclass
class SpoolEntry:
    queue_id: str
    tenant_id: int
    stream: str
    mail_from: str
    recipients: list[str]
    header_from_domain: str
    message_id_header: str
    data: bytes
    client_address: str
    auth_user: str | None
    # None: the spool stamps it with its clock when it takes the entry (the sandbox's shifted
    # time there, so retries and expiry count from the same time the delivery engine reads).
    created_at: datetime | None = None
    # The customer's warm-up candidate header said so (relay/submission/server.py).
    warmup_candidate: bool = False


class SpoolUnavailable(Exception):
    """The spool could not commit; the caller must answer 451 and keep nothing."""


class Spool:
    def __init__(self, engine: Engine, batch_max: int = 256, clock: Clock | None = None):
        self._engine = engine
        self._clock = clock or SystemClock()
        # On SQLite the batch goes through fixed sqlite3 statements (models/bulk.py).
        self._fixed = (
            (fixed_insert(engine, Message.__table__), fixed_insert(engine, Recipient.__table__))
            if is_sqlite(engine)
            else None
        )
        self._writer: GroupCommitter[SpoolEntry] = GroupCommitter(
            self._commit, batch_max=batch_max, name="spool-writer"
        )

    @property
    def on_commit(self):
        """Called on the event loop after each committed batch (wakes the delivery engine)."""
        return self._writer.on_commit

    @on_commit.setter
    def on_commit(self, callback) -> None:
        self._writer.on_commit = callback

    def start(self) -> None:
        self._writer.start()

    def stop(self) -> None:
        self._writer.stop()

    async def put(self, entry: SpoolEntry) -> str:
        """Returns the queue id once the entry is committed; raises SpoolUnavailable."""
        if entry.created_at is None:
            entry.created_at = self._clock.now()
        try:
            await self._writer.submit(entry)
        except Exception as exc:
            raise SpoolUnavailable(str(exc)) from exc
        return entry.queue_id

    def _commit(self, entries: list[SpoolEntry]) -> None:
        messages, recipients = spool_rows(entries)
        if self._fixed is not None:
            insert_messages, insert_recipients = self._fixed
            with sqlite_write(self._engine) as conn:
                conn.executemany(insert_messages.sql, insert_messages.rows(messages))
                conn.executemany(insert_recipients.sql, insert_recipients.rows(recipients))
            return
        with self._engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), recipients)


def spool_rows(entries: list[SpoolEntry]) -> tuple[list[dict], list[dict]]:
    """The Message and Recipient rows for entries (shared with the DSN writer)."""
    for e in entries:
        if e.created_at is None:
            e.created_at = datetime.now(UTC)
    messages = [
        {
            "id": e.queue_id,
            "tenant_id": e.tenant_id,
            "stream": e.stream,
            "mail_from": e.mail_from,
            "header_from_domain": e.header_from_domain,
            "message_id_header": e.message_id_header,
            "size": len(e.data),
            "data": e.data,
            "client_address": e.client_address,
            "auth_user": e.auth_user,
            "warmup_candidate": e.warmup_candidate,
            "created_at": e.created_at,
        }
        for e in entries
    ]
    recipients = [
        {
            "message_id": e.queue_id,
            "address": rcpt,
            "domain": rcpt.rpartition("@")[2].lower(),
            "state": RecipientState.queued,
            "attempts": 0,
            "next_attempt_at": e.created_at,
            "updated_at": e.created_at,
        }
        for e in entries
        for rcpt in e.recipients
    ]
    return messages, recipients
