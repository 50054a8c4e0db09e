"""Reads the two kinds of report receivers send back about mail: complaints and bounces.

A complaint is an ARF report (RFC 5965): multipart/report; report-type=feedback-report with a
message/feedback-report part (Feedback-Type, User-Agent, Original-Rcpt-To …) and the original
message or its headers. A bounce is a DSN (RFC 3464): multipart/report;
report-type=delivery-status with a message/delivery-status part, one block per recipient.
Anything else is not a report (None). Parsing only; relay/intake.py decides what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message as EmailMessage
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr

MAX_BLOCKS = 100  # per-recipient blocks read from one DSN
MAX_VALUE = 500  # longest field value kept
# The Received header relay/server.py adds: "by HOST (Axiom Send) with ESMTPSA id QUEUEID;"
_OUR_RECEIVED = re.compile(r"\(Axiom Send\)\s+with\s+\S+\s+id\s+([0-9A-Z]{26})\b", re.IGNORECASE)
_FOLD = re.compile(r"\r?\n[ \t]*")
_ORIGINAL_HEADERS = {"text/rfc822-headers", "message/global-headers"}
_ORIGINAL_MESSAGE = {"message/rfc822", "message/global"}


@dataclass(frozen=True)
class Original:
    """What a report quotes of the message it is about."""

    queue_ids: tuple[str, ...] = ()  # from the Received headers we added
    message_id: str | None = None
    from_domain: str | None = None
    to: tuple[str, ...] = ()  # To and Cc addresses


@dataclass(frozen=True)
class Complaint:
    """An ARF report: a recipient marked the message as spam (or as fraud, virus, …)."""

    feedback_type: str
    user_agent: str
    reporting_mta: str | None
    source_ip: str | None
    original_mail_from: str | None
    original_rcpt_to: tuple[str, ...]
    reported_domains: tuple[str, ...]
    arrival_date: str | None
    original: Original
    kind = "complaint"


@dataclass(frozen=True)
class RecipientStatus:
    recipient: str
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # RFC 3463, e.g. 5.1.1
    diagnostic: str | None  # e.g. "smtp; 550 5.1.1 user unknown"
    remote_mta: str | None


@dataclass(frozen=True)
class Bounce:
    """A DSN: what happened to some recipients of the message, after it left us."""

    reporting_mta: str | None
    recipients: tuple[RecipientStatus, ...]
    original: Original
    kind = "bounce"


Report = Complaint | Bounce


def parse_report(raw: bytes) -> Report | None:
    """The complaint or bounce in raw, or None when it is neither (or lacks its report part)."""
    message = message_from_bytes(raw)
    if message.get_content_type() != "multipart/report":
        return None
    report_type = str(message.get_param("report-type", "")).lower()
    parts = message.get_payload()
    if not isinstance(parts, list):
        return None
    original = _original(parts)
    if report_type == "feedback-report":
        return _complaint(parts, original)
    if report_type == "delivery-status":
        return _bounce(parts, original)
    return None


def _complaint(parts: list[EmailMessage], original: Original) -> Complaint | None:
    part = _part(parts, {"message/feedback-report"})
    if part is None:
        return None
    fields: dict[str, list[str]] = {}
    for block in _blocks(part)[:1]:
        for name, value in block:
            fields.setdefault(name.lower(), []).append(value)
    if "feedback-type" not in fields:
        return None

    def one(name: str) -> str | None:
        values = fields.get(name)
        return values[0] if values else None

    return Complaint(
        feedback_type=(one("feedback-type") or "").lower(),
        user_agent=one("user-agent") or "",
        reporting_mta=_typed(one("reporting-mta")),
        source_ip=one("source-ip"),
        original_mail_from=_address(one("original-mail-from")) or None,
        original_rcpt_to=tuple(
            a for a in (_address(v) for v in fields.get("original-rcpt-to", [])) if a
        ),
        reported_domains=tuple(
            d.lower().strip(".") for d in fields.get("reported-domain", []) if d
        ),
        arrival_date=one("arrival-date"),
        original=original,
    )


def _bounce(parts: list[EmailMessage], original: Original) -> Bounce | None:
    part = _part(parts, {"message/delivery-status", "message/global-delivery-status"})
    if part is None:
        return None
    blocks = _blocks(part)
    if not blocks:
        return None
    per_message = {name.lower(): value for name, value in blocks[0]}
    recipients = []
    for block in blocks[1 : MAX_BLOCKS + 1]:
        fields = {name.lower(): value for name, value in block}
        recipient = _address(_typed(fields.get("final-recipient")))
        if not recipient:
            recipient = _address(_typed(fields.get("original-recipient")))
        if not recipient:
            continue
        recipients.append(
            RecipientStatus(
                recipient=recipient,
                action=fields.get("action", "").lower(),
                status=fields.get("status", "").split(" ")[0],
                diagnostic=fields.get("diagnostic-code"),
                remote_mta=_typed(fields.get("remote-mta")),
            )
        )
    if not recipients:
        return None
    return Bounce(_typed(per_message.get("reporting-mta")), tuple(recipients), original)


# ------------------------------------------------------------------ the parts
def _part(parts: list[EmailMessage], types: set[str]) -> EmailMessage | None:
    return next((p for p in parts if p.get_content_type() in types), None)


def _blocks(part: EmailMessage) -> list[list[tuple[str, str]]]:
    """The field blocks of a message/feedback-report or message/delivery-status part.

    The email package parses message/delivery-status into one Message per block and leaves
    other message/* subtypes as text; both shapes come out as lists of (name, value)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [[(n, _clean(v)) for n, v in block.items()] for block in payload]
    text = part.get_payload(decode=True) or b""
    blocks = re.split(r"\r?\n[ \t]*\r?\n", text.decode("utf-8", "replace").strip())
    parser = HeaderParser()
    return [
        [(n, _clean(v)) for n, v in parser.parsestr(block).items()] for block in blocks if block
    ]


def _original(parts: list[EmailMessage]) -> Original:
    headers: EmailMessage | None = None
    for part in parts:
        kind = part.get_content_type()
        if kind in _ORIGINAL_MESSAGE and isinstance(part.get_payload(), list):
            headers = part.get_payload()[0]
        elif kind in _ORIGINAL_HEADERS:
            text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
            headers = HeaderParser().parsestr(text.lstrip("\r\n"))
        if headers is not None:
            break
    if headers is None:
        return Original()
    queue_ids = tuple(
        m.group(1).upper()
        for received in headers.get_all("Received", [])
        for m in [_OUR_RECEIVED.search(_clean(received))]
        if m
    )
    from_address = parseaddr(_clean(headers.get("From", "")))[1]
    to = [_clean(v) for name in ("To", "Cc") for v in headers.get_all(name, [])]
    return Original(
        queue_ids=queue_ids,
        message_id=_clean(headers.get("Message-ID", "")) or None,
        from_domain=from_address.rpartition("@")[2].lower() or None,
        to=tuple(a.lower() for _, a in getaddresses(to) if "@" in a),
    )


# ------------------------------------------------------------------ field values
def _clean(value: object) -> str:
    return _FOLD.sub(" ", str(value)).strip()[:MAX_VALUE]


def _typed(value: str | None) -> str | None:
    """A typed field's value without its type: "dns; mx.example" → "mx.example"."""
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    return (rest if sep else kind).strip() or None


def _address(value: str | None) -> str:
    """An address as a report quotes it (<a@b>, a@b, rfc822;a@b), lower-cased, or ''."""
    if not value:
        return ""
    address = parseaddr(value)[1] or value.strip().strip("<>")
    return address.lower() if "@" in address and " " not in address else ""
