"""Our changes to aiosmtplib: pipelining protocol, remembered quoting, no needless rewrite.

1. SMTPProtocol: aiosmtplib.SMTP builds its protocol from the module-level name
   aiosmtplib.smtp.SMTPProtocol at each connect; install() points it at our
   relay.delivery.pipelining.PipeliningProtocol, which is aiosmtplib's protocol plus RFC 2920
   groups (see that module). It reads aiosmtplib's private _buffer, _command_lock,
   _response_pending and _read_response_from_buffer, hence the pinned versions below.

2. For every message aiosmtplib (a) parses the sender and each recipient with the stdlib's
   email.utils.parseaddr to quote them for MAIL and RCPT, and (b) rewrites the whole message
   through a regex that turns lone CR or LF into CRLF. Together that was ~8 % of the
   delivering process's time (py-spy, bench/end_to_end.py). Here (a) is remembered per address
   (a pure function of a string; addresses repeat, above all the sender) and (b) is skipped
   when the message already has only CRLF line ends, as everything the spool holds has
   (submission refuses a bare CR or LF). tests/unit/test_smtp_client.py checks both equal
   aiosmtplib's own; tests/unit/test_patches.py that aiosmtplib still looks each name up.
"""

from __future__ import annotations

import functools

import aiosmtplib.protocol as _protocol
import aiosmtplib.smtp as _smtp

from relay.delivery.pipelining import PipeliningProtocol
from relay.patches.replacements import Replacements

DISTRIBUTION = "aiosmtplib"
TESTED = ">=5.1.3,<5.2"  # a PEP 440 range, parsed only by the start-up check

_quote_address = _smtp.quote_address
_normalize = _protocol.normalize_message_line_endings
_SMTPProtocol = _smtp.SMTPProtocol


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


# (namespace, name, aiosmtplib's own, ours): where aiosmtplib looks each one up.
REPLACEMENTS = Replacements(
    (_smtp, "SMTPProtocol", _SMTPProtocol, PipeliningProtocol),
    (_smtp, "quote_address", _quote_address, quote_address),
    (_protocol, "normalize_message_line_endings", _normalize, normalize_message_line_endings),
)


install = REPLACEMENTS.install
uninstall = REPLACEMENTS.uninstall
installed = REPLACEMENTS.installed
