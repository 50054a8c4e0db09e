"""Tenant policy as the mail path needs it: who is this, which domains, whom not to mail.

These are blocking database reads; the SMTP handler calls them through a thread. Small,
short-TTL caches keep the hot path (one message per connection) off the database without
letting a change — a domain activated, a key rotated, a credential disabled — wait long.
Every lookup also answers `without_waiting=True`: the answer if it can be had without waiting, else
WOULD_WAIT, and the caller asks again from a thread. A cached answer costs microseconds, less
than the hop to a thread and back (which, with the event loop holding the GIL, also waits for
the GIL twice). The suppression check is not cached (a hard bounce must stop the next message
at once); on a SQLite file it is an indexed point read that in WAL mode takes no lock, so it
too answers at once, from a connection that never waits (busy_timeout 0: if SQLite is ever
busy, e.g. recovering the WAL index, the read goes to a thread). On PostgreSQL every read is
a network round trip and always goes to a thread.
"""

from __future__ import annotations

import functools
import ipaddress
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlmodel import Session, col, select

from models import (
    ClientNetwork,
    Credential,
    DkimKey,
    Domain,
    DomainState,
    KeyState,
    Suppression,
    Tenant,
)
from relay.submission.auth import CredentialCache, Principal, verify_password
from relay.submission.dkim import SigningKey, load_signing_key
from relay.submission.keystore import KeyBox

K = TypeVar("K")
V = TypeVar("V")
WOULD_WAIT: Any = (
    object()
)  # an without_waiting=True lookup that would have to wait for the database
# The client's address, parsed once per address rather than once per connection (clients
# reconnect from the same few addresses; a ValueError is not remembered and is raised again).
_ip_address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self._ttl, self._clock = ttl, clock
        self._data: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def peek(self, key: K) -> V:
        """The live cached value, or WOULD_WAIT; never loads."""
        return self._peek(key, self._clock())

    def _peek(self, key: K, now: float) -> V:
        with self._lock:
            hit = self._data.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        return WOULD_WAIT

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        now = self._clock()
        value = self._peek(key, now)
        if value is not WOULD_WAIT:
            return value
        value = load()
        with self._lock:
            self._data[key] = (now + self._ttl, value)
        return value


@dataclass(frozen=True)
class SendingDomain:
    tenant_id: int
    name: str
    active: bool


class PolicyStore:
    def __init__(
        self, engine: Engine, keybox: KeyBox, credentials: CredentialCache, ttl: float = 5.0
    ):
        self._engine = _reader(engine)
        self._instant = _instant_reader(engine)  # None: every suppression read takes a thread
        self._keybox = keybox
        self._credentials = credentials
        self._domains: TtlCache[str, SendingDomain | None] = TtlCache(ttl)
        self._networks: TtlCache[str, list[tuple[ipaddress._BaseNetwork, Principal]]] = TtlCache(
            ttl
        )
        self._keys: TtlCache[str, list[SigningKey]] = TtlCache(ttl * 12)
        # Every paused tenant's id in one entry: one small query per ttl for all tenants, a set
        # lookup per MAIL; a pause reaches new submissions within ttl seconds.
        self._paused: TtlCache[str, frozenset[int]] = TtlCache(ttl)

    # --- who ---
    def authenticate(self, username: bytes, password: bytes) -> Principal | None:
        cached = self._credentials.get(username, password)
        if cached is not None:
            return cached
        try:
            name = username.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            return None
        with Session(self._engine) as session:
            row = session.exec(
                select(Credential, Tenant)
                .join(Tenant, Tenant.id == Credential.tenant_id)
                .where(Credential.username == name, Credential.disabled == False)  # noqa: E712
            ).first()
        stored = row[0].password_hash if row else None
        if not verify_password(stored, secret) or row is None:
            return None
        principal = Principal(row[1].id, row[1].name, name)
        self._credentials.put(username, password, principal)
        return principal

    def principal_for_network(self, client_ip: str, *, without_waiting: bool = False):
        """The Principal bound to the client's network, or None."""
        try:
            addr = _ip_address(client_ip)
        except ValueError:
            return None
        if without_waiting:
            networks = self._networks.peek("all")
            if networks is WOULD_WAIT:
                return WOULD_WAIT
        else:
            networks = self._networks.get_or_load("all", self._load_networks)
        for network, principal in networks:
            if addr.version == network.version and addr in network:
                return principal
        return None

    def _load_networks(self):
        with Session(self._engine) as session:
            rows = session.exec(
                select(ClientNetwork, Tenant).join(Tenant, Tenant.id == ClientNetwork.tenant_id)
            ).all()
        return [
            (ipaddress.ip_network(net.cidr, strict=False), Principal(t.id, t.name, None))
            for net, t in rows
        ]

    def tenant_paused(self, tenant_id: int, *, without_waiting: bool = False):
        """Whether the operator paused this tenant's sending (or WOULD_WAIT, see
        without_waiting)."""
        if without_waiting:
            paused = self._paused.peek("all")
            if paused is WOULD_WAIT:
                return WOULD_WAIT
        else:
            paused = self._paused.get_or_load("all", self._load_paused)
        return tenant_id in paused

    def _load_paused(self) -> frozenset[int]:
        with self._engine.connect() as conn:
            return frozenset(
                conn.execute(select(Tenant.id).where(Tenant.paused == True)).scalars()  # noqa: E712
            )

    # --- which domains ---
    def sending_domain(self, name: str, *, without_waiting: bool = False):
        """The SendingDomain, or None when unknown (or WOULD_WAIT, see without_waiting)."""
        name = name.lower().rstrip(".")
        if without_waiting:
            return self._domains.peek(name)
        return self._domains.get_or_load(name, lambda: self._load_domain(name))

    def _load_domain(self, name: str) -> SendingDomain | None:
        with Session(self._engine) as session:
            domain = session.exec(select(Domain).where(Domain.name == name)).first()
        if domain is None:
            return None
        return SendingDomain(domain.tenant_id, domain.name, domain.state == DomainState.active)

    def may_send_as(self, principal: Principal, domain_name: str, *, without_waiting: bool = False):
        """Whether principal may send as domain_name (or WOULD_WAIT, see without_waiting)."""
        domain = self.sending_domain(domain_name, without_waiting=without_waiting)
        if domain is WOULD_WAIT:
            return WOULD_WAIT
        return domain is not None and domain.active and domain.tenant_id == principal.tenant_id

    # --- whom not to mail ---
    def suppression_reason(self, tenant_id: int, address: str, *, without_waiting: bool = False):
        """Why the tenant must not mail address, or None (or WOULD_WAIT, see without_waiting).
        Once per recipient, uncached: a plain Core read (an ORM Session costs more than it)."""
        if without_waiting:
            if self._instant is None:
                return WOULD_WAIT
            try:
                return self._instant.reason(tenant_id, address.lower())
            except sqlite3.OperationalError:  # SQLite busy ("database is locked"): a thread
                return WOULD_WAIT
        with self._engine.connect() as conn:
            return conn.execute(
                select(Suppression.reason).where(
                    Suppression.tenant_id == tenant_id, Suppression.address == address.lower()
                )
            ).scalar()

    # --- how to sign ---
    def signing_keys(self, domain_name: str, *, without_waiting: bool = False):
        """The domain's active keys, RSA first (or WOULD_WAIT, see without_waiting)."""
        name = domain_name.lower()
        if without_waiting:
            return self._keys.peek(name)
        return self._keys.get_or_load(name, lambda: self._load_keys(name))

    def _load_keys(self, name: str) -> list[SigningKey]:
        with Session(self._engine) as session:
            rows = session.exec(
                select(DkimKey)
                .join(Domain, Domain.id == DkimKey.domain_id)
                .where(Domain.name == name, DkimKey.state == KeyState.active)
                .order_by(col(DkimKey.algorithm).desc())  # rsa before ed25519
            ).all()
        return [
            load_signing_key(
                name, k.selector, k.algorithm, self._keybox.open(k.private_key_encrypted)
            )
            for k in rows
        ]


def _reader(engine: Engine) -> Engine:
    """The engine policy reads use. On a SQLite file: connections of their own that never
    take the write lock. models/db.py opens every SQLite transaction with BEGIN IMMEDIATE so
    that writers queue rather than fail on lock upgrade; a policy read doing the same waits
    behind every spool commit in SQLite's busy handler (sleeps of 1 to 100 ms), and with
    AXIOM_RELAY_PROCESSES > 1 behind every other process's commits too. In WAL mode a read
    needs no lock: each SELECT here runs alone in autocommit and sees committed data."""
    url = engine.url
    database = url.database or ""
    if engine.dialect.name != "sqlite" or database in ("", ":memory:") or "mode=memory" in database:
        return engine  # PostgreSQL has no such lock; an in-memory database is one connection
    reader = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(reader, "connect", _read_only_pragmas)
    return reader


class _PointReader:
    """Suppression point reads on a SQLite file, on the calling thread, that never wait.

    One plain sqlite3 connection per thread (busy_timeout 0, query_only) and one fixed
    statement: building the SQLAlchemy select for every recipient cost ten times the read
    itself (~12 % of a listener's CPU in bench/submission.py)."""

    _SQL = f"SELECT reason FROM {Suppression.__tablename__} WHERE tenant_id = ? AND address = ?"

    def __init__(self, path: str):
        self._path = path
        self._local = threading.local()

    def reason(self, tenant_id: int, address: str) -> str | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=0, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        row = conn.execute(self._SQL, (tenant_id, address)).fetchone()
        return row[0] if row else None


def _instant_reader(engine: Engine) -> _PointReader | None:
    """On a SQLite file, reads for the event loop; None elsewhere."""
    database = engine.url.database or ""
    if engine.dialect.name != "sqlite" or database in ("", ":memory:") or "mode=memory" in database:
        return None
    return _PointReader(database)


def _read_only_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # no implicit BEGIN: every statement its own snapshot
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA query_only=ON")
    cur.close()
