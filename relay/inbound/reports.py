"""Reads the two kinds of report receivers send back about mail: complaints and bounces.

A complaint is an ARF report (RFC 5965): multipart/report; report-type=feedback-report with a
message/feedback-report part (Feedback-Type, User-Agent, Original-Rcpt-To …) and the original
message or its headers. A bounce is a DSN (RFC 3464): multipart/report;
report-type=delivery-status with a message/delivery-status part, one block per recipient.

Real bounces are not all RFC 3464: Exim, qmail, Exchange 2003, Gmail's and Yahoo's older
notices, Domino and many others write plain text. Those are read by flufl.bounce (Mailman's
bounce detectors), which finds the failed addresses and whether they failed for good; the SMTP
reply each quotes is then looked for in the text near the address, to be classified like a
reply at delivery time. A bounce that neither reads but that arrived at a tagged return path
(relay/delivery/return_path.py: the tag names the recipient) is still one when a mailer daemon
sent it and it quotes a 4xx/5xx reply with an enhanced status code: its recipient is then left
empty, for the tag to name. Anything else is not a report (None). Parsing only;
relay/inbound/feedback.py decides what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message as EmailMessage
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr

from flufl.bounce import all_failures

MAX_BLOCKS = 100  # per-recipient blocks read from one DSN
MAX_VALUE = 500  # longest field value kept
# The Received header relay/server.py adds: "by HOST (Axiom Send) with ESMTPSA id QUEUEID;"
_OUR_RECEIVED = re.compile(r"\(Axiom Send\)\s+with\s+\S+\s+id\s+([0-9A-Z]{26})\b", re.IGNORECASE)
_FOLD = re.compile(r"\r?\n[ \t]*")
_ORIGINAL_HEADERS = {"text/rfc822-headers", "message/global-headers"}
_ORIGINAL_MESSAGE = {"message/rfc822", "message/global"}
MAX_TEXT = 200_000  # characters of a plain-text bounce searched for the replies it quotes
# An SMTP reply quoted in a bounce's text: "550 5.1.1 <a@b>: user unknown", "550-5.1.1 The
# email account…", qmail's "550 #5.1.1 …", Exchange's "#550 5.1.1 RESOLVER…" or a reply
# without an enhanced code ("554 delivery error: …"). Not inside a word, a number or an IP.
_QUOTED_REPLY = re.compile(
    r"(?<![\w.:/+-])#?([45][0-5][0-9])([ -])\s*#?(?:([245]\.[0-9]{1,3}\.[0-9]{1,3})(?![\w.]))?"
    r"(?=[ \t]*([^\r\n]*))"  # the text: looked at, not consumed ("554 554 5.7.0 …" has two)
)
_BARE_ENHANCED = re.compile(r"^\s*([245]\.[0-9]{1,3}\.[0-9]{1,3})\s+(\S.*)$")
_ENHANCED_IN_TEXT = re.compile(r"(?<![\w.])#?([245]\.[0-9]{1,3}\.[0-9]{1,3})(?![\w.])")
# Where a bounce's own words end and its copy of the message begins.
_COPY_FOLLOWS = re.compile(r"^\s*(-{2,}|original message|below this line)", re.IGNORECASE)
# Who sends bounces: the local part of their From address.
_DAEMONS = re.compile(r"^(mailer-daemon|mail-daemon|postmaster|mailerdaemon|bounce[sd]?)$", re.I)
_MESSAGE_ID_LINE = re.compile(r"^message-id:\s*(<[^>\s]+>)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Original:
    """What a report quotes of the message it is about."""

    queue_ids: tuple[str, ...] = ()  # from the Received headers we added
    message_id: str | None = None
    from_domain: str | None = None
    to: tuple[str, ...] = ()  # To and Cc addresses
    return_paths: tuple[str, ...] = ()  # its Return-Path headers (added at final delivery)


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
    """A bounce: what happened to some recipients of the message, after it left us."""

    reporting_mta: str | None
    recipients: tuple[RecipientStatus, ...]
    original: Original
    format: str = "rfc3464"  # rfc3464 | text (flufl.bounce) | quoted-reply (tagged fallback)
    kind = "bounce"


Report = Complaint | Bounce


def parse_report(raw: bytes, *, tagged: bool = False) -> Report | None:
    """The complaint or bounce in raw, or None when it is neither (or lacks its report part).
    tagged: it came to a tagged return path, which names the recipient (see the docstring)."""
    message = message_from_bytes(raw)
    if message.get_content_type() == "multipart/report":
        report = _standard(message)
        if report is not None:
            return report
    return _plain_bounce(message, tagged)


def _standard(message: EmailMessage) -> Report | None:
    """An ARF report or an RFC 3464 DSN."""
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


# ------------------------------------------------------------------ plain-text bounces
def _plain_bounce(message: EmailMessage, tagged: bool) -> Bounce | None:
    try:
        temporary, permanent = all_failures(message)
    except Exception:  # a detector that trips over a malformed message: not read by it
        temporary, permanent = frozenset(), frozenset()
    text = _report_text(message)
    statuses = []
    for failed, action in ((permanent, "failed"), (temporary - permanent, "delayed")):
        for raw_address in sorted(failed)[:MAX_BLOCKS]:
            address = _address(raw_address.decode("ascii", "replace"))
            if address and len(statuses) < MAX_BLOCKS:
                said = _quoted_reply(text, address) or _line_about(text, address)
                statuses.append(
                    RecipientStatus(
                        recipient=address,
                        action=action,
                        status=_status_of(said, action),
                        diagnostic=said,
                        remote_mta=None,
                    )
                )
    if statuses:
        return Bounce(_reporting_mta(message), tuple(statuses), _quoted_original(text), "text")
    if not tagged or not _from_daemon(message):
        return None
    reply = _quoted_reply(text, None)
    if reply is None or _QUOTED_REPLY.match(reply)[3] is None:
        return None  # only a reply with an enhanced code says "this is a bounce" here
    action = "failed" if reply.startswith("5") else "delayed"
    status = RecipientStatus("", action, _status_of(reply, action), reply, None)
    return Bounce(_reporting_mta(message), (status,), _quoted_original(text), "quoted-reply")


def _report_text(message: EmailMessage) -> str:
    """The bounce's own text: its text/* parts, not those of a message it encloses."""
    texts: list[str] = []

    def walk(part: EmailMessage) -> None:
        kind = part.get_content_type()
        if part.is_multipart():
            for sub in part.get_payload():
                if isinstance(sub, EmailMessage) and sub.get_content_type() not in (
                    _ORIGINAL_MESSAGE | _ORIGINAL_HEADERS
                ):
                    walk(sub)
        elif part.get_content_maintype() == "text" and kind not in _ORIGINAL_HEADERS:
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "utf-8"
            try:
                texts.append(payload.decode(charset, "replace"))
            except LookupError:
                texts.append(payload.decode("utf-8", "replace"))

    walk(message)
    return "\n".join(texts)[:MAX_TEXT]


def _quoted_reply(text: str, address: str | None) -> str | None:
    """The SMTP reply the text quotes about address (else anywhere): the first one with an
    enhanced status code from the line that names the address on, else the first without;
    continuation lines of the same code (550-…, 550 …) are joined. A bare enhanced code at
    the start of a line (GMX: "5.2.2 <a@b>... Mailbox Full") stands for x50 of its class."""
    lines = text.splitlines()
    start = 0
    if address:
        start = next((i for i, line in enumerate(lines) if address in line.lower()), 0)
    for window in (lines[start : start + 12], lines):
        found: str | None = None
        for index, line in enumerate(window):
            for m in _QUOTED_REPLY.finditer(line):
                if m[3] is not None:
                    return _joined(window, index, m)
                if found is None and re.match(r"[<A-Za-z(\[]", m[4] or ""):
                    found = _joined(window, index, m)
            bare = _BARE_ENHANCED.match(line)
            if bare is not None:
                return _clean(f"{bare[1][0]}50 {bare[1]} {bare[2]}")
        if found:
            return found
    return None


def _joined(lines: list[str], index: int, first: re.Match[str]) -> str:
    code = first[1]
    parts = [f"{code} {first[3]} {first[4]}" if first[3] else f"{code} {first[4]}"]
    dash = first[2] == "-"
    for line in lines[index + 1 : index + 10]:
        if not dash:
            break
        m = _QUOTED_REPLY.search(line)
        if m is None or m[1] != code:
            break
        parts.append(m[4])
        dash = m[2] == "-"
    return _clean(" ".join(p.strip() for p in parts if p.strip()))


def _status_of(reply: str | None, action: str) -> str:
    """The reply's enhanced code, else one the text gives on its own (qmail: "(#4.4.1)")."""
    if reply:
        m = _QUOTED_REPLY.match(reply)
        if m and m[3]:
            return m[3]
        m = _ENHANCED_IN_TEXT.search(reply)
        if m:
            return m[1]
    return "5.0.0" if action == "failed" else "4.0.0"


def _line_about(text: str, address: str) -> str | None:
    """What the text says beside the address when it quotes no reply: the rest of the line
    that names it and the two lines after ("The recipient name is not recognized")."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if address in line.lower():
            rest = re.sub(re.escape(address), "", line, flags=re.IGNORECASE)
            said = [rest.strip(" \t<>:;,.-\"'()")]
            for following in lines[index + 1 : index + 4]:
                if _COPY_FOLLOWS.match(following):
                    break
                if following.strip() and len(said) < 3:
                    said.append(following.strip())
            return _clean(" ".join(x for x in said if x)) or None
    return None


def _from_daemon(message: EmailMessage) -> bool:
    local = parseaddr(_clean(message.get("From", "")))[1].rpartition("@")[0]
    return bool(_DAEMONS.match(local))


def _reporting_mta(message: EmailMessage) -> str | None:
    domain = parseaddr(_clean(message.get("From", "")))[1].rpartition("@")[2]
    return domain.lower() or None


def _quoted_original(text: str) -> Original:
    """What a plain-text bounce's copy of the original says: our Received header's queue id,
    its Message-ID."""
    unfolded = _FOLD.sub(" ", text)
    found = _MESSAGE_ID_LINE.search(text)
    return Original(
        queue_ids=tuple(m.group(1).upper() for m in _OUR_RECEIVED.finditer(unfolded)),
        message_id=found.group(1) if found else None,
    )


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
    return_paths = [_address(_clean(v)) for v in headers.get_all("Return-Path", [])]
    return Original(
        queue_ids=queue_ids,
        message_id=_clean(headers.get("Message-ID", "")) or None,
        from_domain=from_address.rpartition("@")[2].lower() or None,
        to=tuple(a.lower() for _, a in getaddresses(to) if "@" in a),
        return_paths=tuple(a for a in return_paths if a),
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
