"""The durable spool: group-committed writes so a 250 always follows a disk commit.

One writer thread drains submissions and commits them together: one fsync covers every
message in the batch, which is how a relay with synchronous=FULL keeps up with many
concurrent sessions. Every future in a batch fails together if the commit fails, and the
SMTP handler turns that into 451 4.3.0; nothing is half-stored because message and
recipients go in the same transaction.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, insert

from models import Message, Recipient, RecipientState

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id(now: float | None = None) -> str:
    """A 26-character, time-sortable id (ULID layout): 48-bit ms timestamp + 80 random bits."""
    value = (int((now or time.time()) * 1000) << 80) | secrets.randbits(80)
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
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class SpoolUnavailable(Exception):
    """The spool could not commit; the caller must answer 451 and keep nothing."""


class Spool:
    def __init__(self, engine: Engine, batch_max: int = 256):
        self._engine = engine
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._started = False
        self.on_commit = None  # called on the event loop after each committed batch

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._started = False

    async def put(self, entry: SpoolEntry) -> str:
        """Returns the queue id once the entry is committed; raises SpoolUnavailable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((entry, loop, future))
        await future
        return entry.queue_id

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self._batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                self._commit([entry for entry, _, _ in batch])
                outcomes = [None] * len(batch)
            except Exception as exc:
                # One bad row must not fail the other tenants' mail in its batch: commit them
                # one by one. If the database itself is down, each fails again, quickly.
                outcomes = (
                    [exc] if len(batch) == 1 else [self._commit_alone(e) for e, _, _ in batch]
                )
            for (_, loop, future), error in zip(batch, outcomes, strict=True):
                loop.call_soon_threadsafe(_settle, future, error)
            if any(error is None for error in outcomes) and self.on_commit is not None:
                batch[0][1].call_soon_threadsafe(self.on_commit)

    def _commit_alone(self, entry: SpoolEntry) -> Exception | None:
        try:
            self._commit([entry])
            return None
        except Exception as exc:
            return exc

    def _commit(self, entries: list[SpoolEntry]) -> None:
        messages, recipients = spool_rows(entries)
        with self._engine.begin() as conn:
            conn.execute(insert(Message), messages)
            conn.execute(insert(Recipient), recipients)


def spool_rows(entries: list[SpoolEntry]) -> tuple[list[dict], list[dict]]:
    """The Message and Recipient rows for entries (shared with the DSN writer)."""
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


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(SpoolUnavailable(str(error)))
