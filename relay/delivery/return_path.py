"""The return path of the mail the relay delivers: MAIL FROM:<bounces+TAG@DOMAIN> (VERP).

As every sending service does, the relay receives the bounces of what it sends: the envelope
sender is an address of its own, so a bounce sent after the receiver's 250 (an asynchronous
bounce: a DSN, or one of the plain-text notices many MTAs still write) comes back to the
inbound listener (relay/inbound/), and the address itself says which message and recipient
it is about. The customer then gets the same DSN a synchronous refusal gives them today.

The tag, lower-case (some MTAs lower-case a local part; it is read back case-insensitively):

    QUEUEID-RECIPIENTID-MAC   one recipient in the transaction (the usual case)
    QUEUEID-MAC               several recipients of the message at one domain, one MAIL FROM

QUEUEID is the message's 26-character queue id, RECIPIENTID the recipient row's id, MAC the
first 10 base32 characters (50 bits) of HMAC-SHA256 over "QUEUEID.RECIPIENTID" (or "QUEUEID")
under a key derived from AXIOM_SECRET_KEY. With the default local part "bounces" the local part
is at most 8 + 26 + 1 + 10 + 1 + 10 = 56 octets, within RFC 5321's 64 (AXIOM_BOUNCE_ADDRESS's
local part may have at most 15). Forgery: a bounce acts (suppresses, notifies the customer)
only when its tag verifies, so only who saw the address can make one act: the receiving MTA,
and the recipient, whose mailbox shows it in Return-Path; with one recipient per tag that is
about their own address only. A tag naming the message only (several recipients of one domain
in one transaction, as the engine groups them) lets the report name which of those recipients
failed. A new AXIOM_SECRET_KEY invalidates the tags of mail sent before it.

The domain: the customer's return-path subdomain (Domain.return_path_domain, e.g.
bounces.shop.example) once its MX (the inbound listener) and SPF (the relay's IPs) are
published (Domain.return_path_published_at): SPF then passes for a domain whose organisational
domain is the From domain's, and DMARC passes through SPF and DKIM alignment both. Until then
the relay's own bounce domain (that of AXIOM_BOUNCE_ADDRESS, default bounces@HOSTNAME): SPF
passes for it but is not aligned with the From domain, and DMARC passes through the DKIM
signature (d= the From domain) alone. "The customer's domain" is the message's From domain, the
one DMARC aligns with. Our own DSNs keep the null sender (RFC 5321 4.5.5).

The published subdomains are read from the database at most every `ttl` seconds, in a thread
(never on the event loop); when the database cannot be read the last answer stands, and at
worst the relay's bounce domain is used, which DMARC still passes through DKIM.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, select

from models import Domain
from models.db import is_sqlite

log = logging.getLogger("axiom.delivery")

QUEUE_ID_LENGTH = 26
MAC_LENGTH = 10  # base32 characters: 50 bits
MAX_LOCAL_PART = 15  # the configured local part, so that local+TAG stays within 64 octets
_KEY_LABEL = b"axiom-send return-path tag v1"
_TAG = re.compile(r"([0-9a-z]{26})(?:-([0-9]{1,10}))?-([a-z2-7]{10})")


@dataclass(frozen=True)
class Tag:
    """What a verified tag names."""

    queue_id: str  # upper-case, as the spool has it
    recipient_id: int | None  # None: the message's recipients at one domain


class _Message(Protocol):
    id: str
    mail_from: str
    from_domain: str


class _Claim(Protocol):
    recipient_id: int


def tag_key(secret: bytes) -> bytes:
    """The tag key, derived from the relay's secret key (never the secret itself)."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


class Tagger:
    """Makes and verifies tags; the listener and the delivery engine share the key."""

    def __init__(self, secret: bytes):
        self._key = tag_key(secret)

    def _mac(self, queue_id: str, recipient_id: int | None) -> str:
        subject = queue_id.upper() if recipient_id is None else f"{queue_id.upper()}.{recipient_id}"
        digest = hmac.new(self._key, subject.encode("ascii"), hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii")[:MAC_LENGTH].lower()

    def tag(self, queue_id: str, recipient_id: int | None = None) -> str:
        middle = "" if recipient_id is None else f"-{recipient_id}"
        return f"{queue_id.lower()}{middle}-{self._mac(queue_id, recipient_id)}"

    def verify(self, tag: str) -> Tag | None:
        """What tag names, or None when it is not one of ours (malformed or forged)."""
        m = _TAG.fullmatch(tag.strip().lower())
        if m is None:
            return None
        queue_id = m[1].upper()
        recipient_id = int(m[2]) if m[2] is not None else None
        if not hmac.compare_digest(m[3], self._mac(queue_id, recipient_id)):
            return None
        return Tag(queue_id, recipient_id)


def check_local_part(local: str) -> str:
    """The bounce mailbox's local part, checked: local+TAG must fit in 64 octets."""
    if not local or len(local.encode()) > MAX_LOCAL_PART or "+" in local:
        raise ValueError(
            f"the bounce address's local part must be 1-{MAX_LOCAL_PART} octets without '+' "
            f"(it is followed by +TAG, and a local part has 64 octets at most), got {local!r}"
        )
    return local


class ReturnPaths:
    """The MAIL FROM of each transaction (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        bounce_address: str,
        secret: bytes,
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        local, _, domain = bounce_address.rpartition("@")
        self.local = check_local_part(local.lower())
        self.bounce_domain = domain.lower().rstrip(".")
        self.tagger = Tagger(secret)
        self._engine = engine
        self._ttl = ttl
        self._clock = clock
        self._published: dict[str, str] = {}  # From domain -> its published return-path domain
        self._loaded_at: float | None = None
        self._lock: asyncio.Lock | None = None

    @classmethod
    def from_settings(cls, settings, engine: Engine) -> ReturnPaths:
        return cls(
            engine, bounce_address=settings.bounce_mailbox, secret=settings.load_secret_key()
        )

    # --- the address ---
    def address(self, queue_id: str, recipient_id: int | None, from_domain: str) -> str:
        domain = self._published.get(from_domain.lower().rstrip("."), self.bounce_domain)
        return f"{self.local}+{self.tagger.tag(queue_id, recipient_id)}@{domain}"

    async def sender(self, message: _Message, claims: Sequence[_Claim]) -> str:
        """The MAIL FROM for message's transaction to claims' recipients."""
        if not message.mail_from:
            return ""  # a DSN of ours: the null sender, never a bounce about a bounce
        if self._stale():
            await self._refresh()
        recipient_id = claims[0].recipient_id if len(claims) == 1 else None
        return self.address(message.id, recipient_id, message.from_domain or "")

    # --- which customer domains have their own, published ---
    def _stale(self) -> bool:
        return self._loaded_at is None or self._clock() - self._loaded_at >= self._ttl

    async def _refresh(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one read for all the jobs that found it stale at once
            if not self._stale():
                return
            try:
                self._published = await asyncio.to_thread(published_return_paths, self._engine)
            except Exception as exc:
                log.warning("return-path domains not read (%s); the last ones stand", exc)
            self._loaded_at = self._clock()

    def refresh_now(self) -> None:
        """Read the published subdomains now (tools and tests; the engine refreshes itself)."""
        self._published = published_return_paths(self._engine)
        self._loaded_at = self._clock()


class CustomersOwnSender:
    """No return path of ours: MAIL FROM is the message's own envelope sender, so bounces go
    to the customer (delivery engines built without ReturnPaths: tests and tools)."""

    async def sender(self, message: _Message, claims: Sequence[_Claim]) -> str:
        return message.mail_from


def published_return_paths(engine: Engine) -> dict[str, str]:
    """From domain -> its published return-path domain."""
    rows = _read(
        engine,
        select(Domain.name, Domain.return_path_domain).where(
            Domain.return_path_domain.is_not(None), Domain.return_path_published_at.is_not(None)
        ),
    )
    return {name.lower(): rp.lower().rstrip(".") for name, rp in rows}


def return_path_domains(engine: Engine) -> set[str]:
    """Every customer return-path domain, published or not yet: the inbound listener takes
    bounces for all of them (mail sent while one was published may bounce after it was not)."""
    rows = _read(
        engine, select(Domain.return_path_domain).where(Domain.return_path_domain.is_not(None))
    )
    return {rp.lower().rstrip(".") for (rp,) in rows}


def _read(engine: Engine, stmt) -> list[tuple]:
    """Rows of a SELECT. On SQLite the statement alone, in autocommit on a pooled connection:
    a read needs no write turn (models/db.py begins every transaction with BEGIN IMMEDIATE)."""
    if not is_sqlite(engine):
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(stmt)]
    compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.execute(str(compiled))
        try:
            return cursor.fetchall()
        finally:
            cursor.close()
    finally:
        raw.close()
