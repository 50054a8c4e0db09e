"""The spool as operators read it: recipients with their state, one message as it will be sent."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, func, select

from models import Message, Recipient
from protocol.errors import ServiceError
from protocol.listing import Page

# A queue id is 26 Crockford base-32 characters; fewer than this many is too short to name
# one message among a busy spool's and too easy to mistype.
MIN_PREFIX = 6


@dataclass(frozen=True)
class SpooledRecipient:
    queue_id: str
    mail_from: str
    address: str
    size: int
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_reply: str | None
    created_at: datetime


@dataclass(frozen=True)
class SpooledMessage:
    message: Message
    recipients: list[Recipient]


def spooled_recipients(session: Session, limit: int) -> Page[SpooledRecipient]:
    """Newest message first, its recipients in the order they were given."""
    if limit < 1:
        raise ServiceError(f"--limit must be 1 or more, got {limit}")
    total = session.exec(select(func.count()).select_from(Recipient)).one()
    rows = session.exec(
        select(Message.id, Message.mail_from, Message.size, Message.created_at, Recipient)
        .join(Recipient, col(Recipient.message_id) == Message.id)
        .order_by(col(Message.created_at).desc(), col(Recipient.id))
        .limit(limit)
    ).all()
    items = [
        SpooledRecipient(
            queue_id=mid,
            mail_from=sender,
            address=r.address,
            size=size,
            state=str(r.state),
            attempts=r.attempts,
            next_attempt_at=r.next_attempt_at,
            last_reply=r.last_reply,
            created_at=created,
        )
        for mid, sender, size, created, r in rows
    ]
    return Page(items, total)


def spooled_message(session: Session, queue_id: str) -> SpooledMessage:
    """The message with this queue id, or with the one queue id that starts with it."""
    wanted = queue_id.strip().upper()
    message = session.get(Message, wanted)
    if message is None:
        message = _by_prefix(session, queue_id, wanted)
    recipients = session.exec(
        select(Recipient).where(Recipient.message_id == message.id).order_by(col(Recipient.id))
    ).all()
    return SpooledMessage(message, list(recipients))


def _by_prefix(session: Session, typed: str, prefix: str) -> Message:
    if len(prefix) < MIN_PREFIX:
        raise ServiceError(
            f"queue id {typed!r} not found (a prefix needs at least {MIN_PREFIX} characters)"
        )
    matches = session.exec(
        select(Message).where(col(Message.id).startswith(prefix, autoescape=True)).limit(3)
    ).all()
    if not matches:
        raise ServiceError(f"queue id {typed!r} not found")
    if len(matches) > 1:
        shown = ", ".join(m.id for m in matches[:2])
        raise ServiceError(f"queue id prefix {typed!r} matches more than one message ({shown}, …)")
    return matches[0]
