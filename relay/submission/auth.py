"""SMTP AUTH: slow password hashes, a short-lived verified-credential cache, brute-force lockout."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# argon2id with the library's RFC 9106 "low memory" profile: ~50 ms per verify here, which is
# why verified credentials are cached (see CredentialCache).
_hasher = PasswordHasher()


@functools.cache
def dummy_hash() -> str:
    """Verified against when the username is unknown, so timing does not reveal which users
    exist. Made on first use (a hash costs ~100 ms, which every CLI command paid at import);
    the relay makes it at start (relay.service), so the first unknown user is not faster."""
    return _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def generate_password() -> str:
    """24 URL-safe characters (144 random bits), never starting with '-': a customer pastes it
    into command lines and config files, and tools read a leading '-' as an option (swaks did,
    in a fresh-clone test run: 'Unknown option')."""
    while True:
        password = secrets.token_urlsafe(18)
        if not password.startswith("-"):
            return password


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or dummy_hash(), password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class Principal:
    """Who a session acts for: a tenant, via a credential or a bound client network."""

    tenant_id: int
    tenant_name: str
    username: str | None  # None when bound by client network


class CredentialCache:
    """Remembers successful verifications for a short TTL.

    Keyed by HMAC(secret, username NUL password), so the cache never holds a password or an
    unkeyed hash of one, and a wrong password can never hit an entry. A disabled credential
    stops working within the TTL.
    """

    def __init__(self, secret: bytes, ttl_seconds: float, clock=time.monotonic):
        self._secret = secret
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def _key(self, username: bytes, password: bytes) -> bytes:
        return hmac.new(self._secret, username + b"\0" + password, hashlib.sha256).digest()

    def get(self, username: bytes, password: bytes) -> Principal | None:
        if self._ttl <= 0:
            return None
        hit = self._entries.get(self._key(username, password))
        if hit is None or hit[0] < self._clock():
            return None
        return hit[1]

    def put(self, username: bytes, password: bytes, principal: Principal) -> None:
        if self._ttl <= 0:
            return
        if len(self._entries) > 10_000:  # bound memory; expired entries go first
            now = self._clock()
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
        self._entries[self._key(username, password)] = (self._clock() + self._ttl, principal)


class LockoutTracker:
    """Counts AUTH failures per client address in a sliding window; locks the address out."""

    def __init__(self, max_failures: int, window: float, lockout: float, clock=time.monotonic):
        self._max, self._window, self._lockout, self._clock = max_failures, window, lockout, clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._locked_until: dict[str, float] = {}

    def is_locked(self, address: str) -> bool:
        until = self._locked_until.get(address)
        if until is None:
            return False
        if until < self._clock():
            del self._locked_until[address]
            return False
        return True

    def record_failure(self, address: str) -> bool:
        """Returns True when this failure starts a lockout (the caller audits it)."""
        now = self._clock()
        window = self._failures[address]
        window.append(now)
        while window and window[0] < now - self._window:
            window.popleft()
        if len(window) >= self._max:
            self._locked_until[address] = now + self._lockout
            window.clear()
            return True
        return False

    def record_success(self, address: str) -> None:
        self._failures.pop(address, None)
