"""One log line per mail event an operator greps for: auth, rejected, queued, send_attempt.

After chasquid's internal/maillog: each line names the event, then key=value fields (client,
tenant, user, id, from, to, reply...), on the logger "axiom.maillog" at INFO, e.g.

    rejected client=127.0.0.1 tenant=acme user=acme-1 command=RCPT from=shop@acme.example
    to=bob@example.org
    reply="550 5.7.1 Recipient bob@example.org is on your suppression list: bounced"

(one line). A value is written as is when it is a plain token, otherwise as a JSON string:
double quotes, backslash escapes, control characters escaped, so a line never breaks and
client text cannot forge a field. Fields whose value is None are left out.

These run on the submission and delivery hot paths: each returns at once when the logger is
disabled for INFO, before anything is formatted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from json.encoder import encode_basestring  # what json.dumps(text, ensure_ascii=False) calls

log = logging.getLogger("axiom.maillog")

# Needs quoting: empty, whitespace, quote, backslash, '=', C0/C1 controls, DEL, and the
# Unicode line and paragraph separators (str.splitlines breaks at every one of these).
_UNSAFE = re.compile(r'[\s"\\=\x00-\x1f\x7f-\x9f\u2028\u2029]')
# The same set within ASCII (\s there is \t\n\v\f\r, \x1c-\x1f and space): a plain byte
# table for sre, where _UNSAFE's Unicode category and big charset cost more per character.
_UNSAFE_ASCII = re.compile(r'[\x00-\x20"\\=\x7f]')
_ESCAPE_AFTER_JSON = re.compile(r"[\x7f-\x9f\u2028\u2029]")  # json.dumps leaves these as is


def enabled() -> bool:
    """Whether maillog lines are written; callers check it before building costly values."""
    return log.isEnabledFor(logging.INFO)


def quote(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text.isascii():
        if text and _UNSAFE_ASCII.search(text) is None:
            return text
        # JSON escapes every other ASCII character that needs it, but not DEL
        quoted = encode_basestring(text)
        return quoted if "\x7f" not in quoted else quoted.replace("\x7f", "\\u007f")
    # Client text decoded with surrogateescape holds lone surrogates that no stream can
    # encode; they become \\udcXX.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if _UNSAFE.search(text) is None:
        return text
    quoted = encode_basestring(text)
    return _ESCAPE_AFTER_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def line(event: str, *fields: tuple[str, object]) -> str:
    """The text of one maillog line (without the logger's timestamp and name)."""
    parts = [event]
    unsafe = _UNSAFE_ASCII.search  # after isascii(): the same as _UNSAFE there
    for key, value in fields:
        if value is None:
            continue
        # quote()'s common case inline (a plain ASCII token goes as is): two lines per message
        # on the relay's hot path, eight fields each. An int is digits and perhaps a minus
        # sign: always a plain token.
        if type(value) is int or (
            type(value) is str and value and value.isascii() and unsafe(value) is None
        ):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={quote(value)}")
    return " ".join(parts)


def auth(client: str, user: str, ok: bool) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(line("auth", ("client", client), ("user", user), ("ok", "yes" if ok else "no")))


def rejected(
    client: str,
    reply: str,
    *,
    tenant: str | None = None,
    user: str | None = None,
    command: str | None = None,
    sender: str | None = None,
    recipients: Iterable[str] | None = None,
) -> None:
    """An error reply (4xx or 5xx) to a client; recipients: the refused RCPT's address, or
    the transaction's recipients when DATA was refused."""
    if log.isEnabledFor(logging.INFO):
        log.info(
            line(
                "rejected",
                ("client", client),
                ("tenant", tenant),
                ("user", user),
                ("command", command),
                ("from", sender),
                ("to", None if recipients is None else ",".join(recipients)),
                ("reply", reply),
            )
        )


def queued(
    client: str,
    queue_id: str,
    sender: str,
    recipients: Iterable[str],
    *,
    tenant: str | None = None,
    user: str | None = None,
) -> None:
    """A message accepted: committed to the spool and answered 250."""
    if log.isEnabledFor(logging.INFO):
        log.info(
            line(
                "queued",
                ("client", client),
                ("tenant", tenant),
                ("user", user),
                ("id", queue_id),
                ("from", sender),
                ("to", ",".join(recipients)),
            )
        )


def send_attempt(
    queue_id: str,
    sender: str,
    recipient: str,
    *,
    attempt: int,
    source_ip: str | None,
    mx: str | None,
    outcome: str,
    reply: str,
) -> None:
    """One recipient's result of one delivery attempt; outcome: delivered, deferred, bounced
    or expired."""
    if log.isEnabledFor(logging.INFO):
        log.info(
            line(
                "send_attempt",
                ("id", queue_id),
                ("from", sender),
                ("to", recipient),
                ("attempt", attempt),
                ("source", source_ip),
                ("mx", mx),
                ("outcome", outcome),
                ("reply", reply),
            )
        )
