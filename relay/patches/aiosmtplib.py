"""aiosmtplib's per-message overheads on the delivery path, paid once instead of every time.

For every message aiosmtplib (a) parses the sender and each recipient with the stdlib's
email.utils.parseaddr to quote them for MAIL and RCPT, and (b) rewrites the whole message
through a regex that turns lone CR or LF into CRLF. Together that was ~8 % of the delivering
process's time (py-spy, bench/end_to_end.py). Here (a) is remembered per address (a pure
function of a string; addresses repeat, above all the sender) and (b) is skipped when the
message already has only CRLF line ends, as everything the spool holds has (submission
refuses a bare CR or LF). tests/unit/test_smtp_client.py checks both equal aiosmtplib's own.
"""

from __future__ import annotations

import functools

import aiosmtplib.protocol as _protocol
import aiosmtplib.smtp as _smtp

_quote_address = _smtp.quote_address
_normalize = _protocol.normalize_message_line_endings


@functools.lru_cache(maxsize=8192)
def quote_address(address: str) -> str:
    """aiosmtplib's quote_address, remembered (a ValueError is not: it is raised each time)."""
    return _quote_address(address)


def normalize_message_line_endings(message: bytes) -> bytes:
    """aiosmtplib's, without the rewrite when every line already ends in CRLF."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") == crlf == message.count(b"\n") and message.endswith(b"\r\n"):
        return message
    return _normalize(message)


def install() -> None:
    """Idempotent; called when relay.delivery.engine is imported."""
    _smtp.quote_address = quote_address
    _protocol.normalize_message_line_endings = normalize_message_line_endings
