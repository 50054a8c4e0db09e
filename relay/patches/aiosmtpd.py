"""Our changes to aiosmtpd: per-class method tables, a cheaper sanitized_log, a quiet Session.

1. Method tables once per class. aiosmtpd's SMTP.__init__ finds the auth_*, handle_* and
   smtp_* methods of the protocol and of the handler with inspect.getmembers() and dir(), and
   inspects handle_EHLO's signature, for every connection. getmembers() evaluates every
   attribute of both objects. With one message per connection (what most applications do)
   that was ~10 % of the relay's CPU per message (py-spy, bench/submission.py). The names do
   not change between connections of the same classes, so install() gives aiosmtpd's module a
   `dir`, a `getmembers` and a `signature` that remember the names per class and bind the
   methods per instance; the tables aiosmtpd builds from them are the same
   (tests/unit/test_smtp_tables.py compares them). Only the name lists are cached, never bound
   methods: each connection still gets methods bound to its own protocol and handler objects.

2. sanitized_log, called twice for every command line, ran its AUTH-masking regex before
   handing the line to a logger that (at our default level) discards it. Ours asks the logger
   first, and masks only what will be written.

3. QuietSession: aiosmtpd 1.4 writes the deprecated Session.login_data itself after every
   successful AUTH, and the property logs "Session.login_data is deprecated" each time
   (aio-libs/aiosmtpd#347, open). The relay reads session.auth_data only; QuietSession keeps
   login_data as a plain attribute. It is no global: SubmissionSMTP._create_session hands it out.

Private methods of aiosmtpd's SMTP that relay/submission/server.py's SubmissionSMTP overrides
(no global is touched; each has a test in tests/unit/test_patches.py that fails if aiosmtpd
stops calling it):
    _getaddr        MAIL/RCPT path parsing: refuses source routes, skips the stdlib parser for
                    plain <local@domain> paths (relay.submission.server.parse_path)
    _handle_client  answers a connection over the per-client limit with 421 and closes
    _timeout_cb     the idle timeout says 421 4.4.2 before closing (aiosmtpd closes silently)
    _create_session QuietSession above

install() touches aiosmtpd.smtp's module globals (inspect, dir, sanitized_log): every
aiosmtpd server in the process sees them, which is why only the relay installs them, at start.
"""

from __future__ import annotations

import inspect
import logging
import types
from functools import lru_cache

import aiosmtpd.smtp as _aiosmtpd_smtp

DISTRIBUTION = "aiosmtpd"
TESTED = ">=1.4.6,<1.5"  # a PEP 440 range, parsed only by the start-up check

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


class QuietSession(_aiosmtpd_smtp.Session):
    """aiosmtpd's Session with login_data as a plain attribute (see the module's note 3)."""

    login_data = None  # shadows the warning property; aiosmtpd still sets it, nobody reads it


def install() -> None:
    """Idempotent."""
    if installed():
        return
    shim = _Inspect("inspect")
    shim.getmembers = _getmembers
    shim.signature = _signature
    _aiosmtpd_smtp.inspect = shim
    _aiosmtpd_smtp.dir = _dir  # module global: shadows the builtin inside aiosmtpd.smtp only
    _aiosmtpd_smtp.sanitized_log = _sanitized_log


def uninstall() -> None:
    """aiosmtpd as published again."""
    _aiosmtpd_smtp.inspect = inspect
    _aiosmtpd_smtp.__dict__.pop("dir", None)  # the builtin again
    _aiosmtpd_smtp.sanitized_log = _aiosmtpd_sanitized_log


def installed() -> bool:
    return isinstance(_aiosmtpd_smtp.inspect, _Inspect)
