"""aiosmtpd's per-connection method tables, built once per class instead of once per connection.

aiosmtpd's SMTP.__init__ finds the auth_*, handle_* and smtp_* methods of the protocol and
of the handler with inspect.getmembers() and dir(), and inspects handle_EHLO's signature,
for every connection. getmembers() evaluates every attribute of both objects. With one
message per connection (what most applications do) that was ~10 % of the relay's CPU per
message (py-spy, bench/submission.py). The names do not change between connections of the
same classes, so this module gives aiosmtpd's module a `dir`, a `getmembers` and a
`signature` that remember the names per class and bind the methods per instance; the
tables aiosmtpd builds from them are the same (tests/unit/test_smtp_tables.py compares them).

Only the name lists are cached, never bound methods: each connection still gets methods
bound to its own protocol and handler objects.

The same goes for aiosmtpd's sanitized_log, called twice for every command line: it ran its
AUTH-masking regex before handing the line to a logger that (at our default level) discards
it. Ours asks the logger first, and masks only what will be written.
"""

from __future__ import annotations

import inspect
import logging
import types
from functools import lru_cache

import aiosmtpd.smtp as _aiosmtpd_smtp

_PREFIXES = ("auth_", "handle_", "smtp_")


@lru_cache(maxsize=256)
def _names(cls: type) -> tuple[str, ...]:
    # The class's names; _dir adds an instance's own attributes with these prefixes.
    return tuple(sorted(n for n in dir(cls) if n.startswith(_PREFIXES)))


def _dir(obj) -> list[str]:
    """dir() as aiosmtpd's __init__ uses it: only names with the prefixes it filters for."""
    names = _names(type(obj))
    own = [k for k in getattr(obj, "__dict__", ()) if k.startswith(_PREFIXES)]
    return sorted(set(names).union(own)) if own else list(names)


def _getmembers(obj, predicate=None):
    """inspect.getmembers() as aiosmtpd's __init__ uses it (filtered for auth_ afterwards)."""
    names = _dir(obj)
    members = [(n, getattr(obj, n)) for n in names]
    if predicate is not None:
        members = [(n, v) for n, v in members if predicate(v)]
    return members


_signatures: dict[object, inspect.Signature] = {}


def _signature(callable_) -> inspect.Signature:
    # handle_EHLO is a bound method: every binding of one function has the same signature
    # (without self), so remember it per function.
    key = getattr(callable_, "__func__", callable_)
    found = _signatures.get(key)
    if found is None:
        found = _signatures[key] = inspect.signature(callable_)
    return found


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}
_aiosmtpd_sanitized_log = _aiosmtpd_smtp.sanitized_log


def _sanitized_log(func, msg, *args, **kwargs) -> None:
    """aiosmtpd's sanitized_log, skipped when func's logger would discard the record."""
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""))
    discarded = (
        isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level)
    )
    if discarded:
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


class _Inspect(types.ModuleType):
    """The inspect module, with the two functions aiosmtpd calls per connection replaced."""

    def __getattr__(self, name):
        return getattr(inspect, name)


def install() -> None:
    """Idempotent; called when relay.submission.server is imported."""
    if isinstance(_aiosmtpd_smtp.inspect, _Inspect):
        return
    shim = _Inspect("inspect")
    shim.getmembers = _getmembers
    shim.signature = _signature
    _aiosmtpd_smtp.inspect = shim
    _aiosmtpd_smtp.dir = _dir  # module global: shadows the builtin inside aiosmtpd.smtp only
    _aiosmtpd_smtp.sanitized_log = _sanitized_log
