"""Every SMTP reply the relay sends, with its enhanced status code (RFC 3463), in one place."""

from __future__ import annotations

import re

# --- connection / AUTH (RFC 4954) ---
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_LOCKED_OUT = "421 4.7.0 Too many failed authentications from your address; try again later"
AUTH_ALREADY = "503 5.5.1 Already authenticated"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_BAD_PLAIN = "501 5.5.2 Cannot split AUTH PLAIN value"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"
TLS_HANDSHAKE_FAILED = "554 5.7.0 TLS handshake failed"

# --- MAIL ---
SENDER_OK = "250 2.1.0 Sender OK"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
SENDER_DOMAIN_NOT_ALLOWED = (
    "550 5.7.1 Sender domain {domain} is not an active domain of your account"
)
SENDER_NULL_NOT_ALLOWED = "550 5.7.1 A null sender is not accepted for submission"
# RFC 3463 X.7.1: delivery not authorized, message refused; 4xx: the client keeps the mail and
# retries, so a pause (`axiom tenant pause`) loses nothing.
TENANT_PAUSED = "451 4.7.1 Sending for this account is paused by the operator; try again later"
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size ({limit} octets)"

# --- RCPT ---
RECIPIENT_OK = "250 2.1.5 Recipient OK"
RELAY_DENIED = "554 5.7.1 Relay access denied"
RECIPIENT_SUPPRESSED = "550 5.7.1 Recipient {address} is on your suppression list: {reason}"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
BAD_SENDER_ADDRESS = "501 5.1.7 Bad sender address syntax"
ROUTED_ADDRESS = "501 5.1.3 Percent-hack, bang-path and source-routed addresses are not accepted"

# --- DATA ---
QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
HEADER_FROM_NOT_ALLOWED = (
    "550 5.7.1 Header From domain {domain} is not an active domain of your account"
)
HEADER_FROM_MISSING = "550 5.6.0 Message must have exactly one From header with one address"
MALFORMED_HEADER = "550 5.6.0 Malformed message header (RFC 5322 2.2): {detail}"
BARE_CR_OR_LF = "550 5.6.0 Bare CR or LF in message data; lines must end with CRLF (RFC 5321 2.3.8)"
# RFC 5321 4.1.1.4 lets mail data carry any ASCII code, control characters only discouraged;
# the message format does not: RFC 5322 3.5's body text and RFC 2045 2.7/2.8's 7bit and 8bit
# data exclude NUL. A receiver that drops NULs reads "\r\n\x00.\r\n" as the end of data, so
# NUL is refused as a media error (RFC 3463 X.6.0: other or undefined media error).
NUL_IN_DATA = "550 5.6.0 Message contains NUL characters (RFC 5322 3.5, RFC 2045 2.8)"
LINE_TOO_LONG = "500 5.5.2 Line too long: RFC 5321 4.5.3.1.6 allows 998 octets"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
NO_SIGNING_KEY = "451 4.7.5 No active DKIM key for {domain}; try again later"

TOO_MANY_HEADERS = "552 5.3.4 Too many header fields (limit {limit})"
HEADER_TOO_LARGE = "552 5.3.4 A header field is too large (limit {limit} octets)"

# --- inbound: bounces and complaint reports (relay/inbound.py) ---
INBOUND_RELAY_DENIED = "550 5.7.1 Relay access denied"
INBOUND_NO_MAILBOX = "550 5.1.1 <{address}>: no such mailbox here"
INBOUND_NOT_A_REPORT = (
    "550 5.7.1 Not a report: only delivery status notifications (RFC 3464) and feedback"
    " reports (RFC 5965) are accepted here"
)
INBOUND_RECORDED = "250 2.0.0 Ok: {kind} recorded, {suppressed} recipient(s) suppressed"
INBOUND_UNMATCHED = "250 2.0.0 Ok: {kind} recorded; it matches no message sent through us"
INBOUND_NOT_RECORDED = "451 4.3.0 Report not recorded; try again later"
# DMARC aggregate reports (RFC 7489 7.2) at the rua address (relay/inbound/dmarc.py). A mail
# without one is refused like a non-report above; one that cannot be read safely says why
# (X.6.0: media error), one that inflates past the limit is too big (X.3.4), one about a domain
# that does not send through us is not ours to keep (X.7.1).
INBOUND_NOT_A_DMARC_REPORT = (
    "550 5.7.1 Not a DMARC aggregate report: only RFC 7489 aggregate reports (XML, gzip or"
    " zip) are accepted here"
)
INBOUND_DMARC_UNREADABLE = "550 5.6.0 DMARC aggregate report refused: {reason}"
INBOUND_DMARC_TOO_LARGE = "552 5.3.4 DMARC aggregate report refused: {reason}"
INBOUND_DMARC_FOREIGN = (
    "550 5.7.1 DMARC aggregate report about {domain}, which does not send through this relay"
)
INBOUND_DMARC_RECORDED = "250 2.0.0 Ok: DMARC aggregate report recorded, {records} record(s)"
INBOUND_DMARC_DUPLICATE = "250 2.0.0 Ok: DMARC aggregate report already recorded"
# A transaction carries one kind of report: the DMARC mailbox's DATA is read differently.
INBOUND_ONE_KIND = (
    "452 4.5.3 DMARC reports and other reports go in separate transactions; send to this"
    " recipient again"
)

# --- session limits ---
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address; try again later"
SESSION_TOO_LONG = "421 4.4.2 Session time limit reached; closing connection"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout; closing connection"
# Postfix's smtpd_hard_error_limit: the session had too many 4xx/5xx replies without a message.
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"

# --- any verb ---
INTERNAL_ERROR = "451 4.3.0 Temporary internal error (ref {ref}); try again later"
SPOOL_UNAVAILABLE = "451 4.3.0 Queue temporarily unavailable; try again later"


# aiosmtpd answers some cases itself with texts that lack enhanced codes or carry other
# codes than ours. Rather than re-implement its parser, we translate on the way out.
_TRANSLATIONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^250 OK$"), "250 2.0.0 OK"),
    (re.compile(r"^221 Bye$"), "221 2.0.0 Bye"),
    (re.compile(r"^552 Error: message size exceeds"), MESSAGE_TOO_BIG),
    (re.compile(r"^552 Error: Too much mail data"), MESSAGE_TOO_BIG),
    (re.compile(r"^500 Line too long"), LINE_TOO_LONG),
    (re.compile(r"^500 Command line too long"), "500 5.5.2 Command line too long"),
    (re.compile(r"^553 5\.1\.3 Error: malformed address"), BAD_ADDRESS),
    (re.compile(r"^503 Error: need MAIL command"), "503 5.5.1 Need MAIL command first"),
    (re.compile(r"^503 Error: need RCPT command"), "503 5.5.1 Need RCPT command first"),
    (re.compile(r"^503 Error: nested MAIL command"), "503 5.5.1 Nested MAIL command"),
    (re.compile(r"^503 Already authenticated"), AUTH_ALREADY),
    (re.compile(r"^503 Error: send HELO first"), "503 5.5.1 Send EHLO or HELO first"),
    (re.compile(r"^503 Error: send EHLO first"), "503 5.5.1 Send EHLO first"),
    (re.compile(r"^500 Error: bad syntax"), "500 5.5.2 Syntax error"),
    (re.compile(r"^500 Error: command .* not recognized"), "500 5.5.1 Command not recognized"),
    (re.compile(r"^500 Error: strict ASCII mode"), "500 5.6.7 Non-ASCII data without SMTPUTF8"),
    (re.compile(r"^501 Syntax: (.*)$"), r"501 5.5.4 Syntax: \1"),
    (re.compile(r"^501 Error: (.*)$"), r"501 5.5.4 \1"),
    (re.compile(r"^501 Not enough value"), "501 5.5.4 AUTH needs a mechanism"),
    (re.compile(r"^501 Too many values"), "501 5.5.4 Too many AUTH arguments"),
    (re.compile(r"^555 (MAIL FROM|RCPT TO) parameters"), r"555 5.5.4 \1 parameters not recognized"),
    (re.compile(r"^530 Must issue a STARTTLS"), "530 5.7.0 Must issue a STARTTLS command first"),
    (re.compile(r"^554 Command refused due to lack"), TLS_HANDSHAKE_FAILED),
    (re.compile(r"^502 EXPN not implemented"), "502 5.5.1 EXPN not implemented"),
    (re.compile(r"^252 Cannot VRFY user"), "252 2.5.0 Cannot VRFY user"),
    (re.compile(r"^421 (.*) Service not available"), r"421 4.3.2 \1 Service not available"),
    (re.compile(r"^500 Error: \(.*\)"), "451 4.3.0 Temporary internal error; try again later"),
    (
        re.compile(r"^500 Error: Cannot describe"),
        "451 4.3.0 Temporary internal error; try again later",
    ),
    # RFC 2034 exempts only the greeting and the HELO/EHLO replies from enhanced codes.
    (re.compile(r"^220 Ready to start TLS$"), "220 2.0.0 Ready to start TLS"),
    (re.compile(r"^454 TLS not available"), "454 4.7.0 TLS not available due to temporary reason"),
    (re.compile(r"^250 Syntax: (.*)$"), r"250 2.0.0 Syntax: \1"),
    (re.compile(r"^502 Could not VRFY (.*)$"), r"502 5.5.1 Could not VRFY \1"),
    (
        re.compile(r"^421 4\.7\.0 (\S+) sent too many times"),
        r"421 4.7.0 Too many \1 commands in this session",
    ),
]


# Every pattern starts with ^ and a reply code, so only the patterns of a reply's own code can
# match it: a 250 tries two patterns instead of all 33 (7 replies per message).
_BY_CODE: dict[str, list[tuple[re.Pattern[str], str]]] = {}
for _pattern, _replacement in _TRANSLATIONS:
    if not re.match(r"\^\d{3} ", _pattern.pattern):
        raise ValueError(f"translation pattern must start with ^ and a reply code: {_pattern}")
    _BY_CODE.setdefault(_pattern.pattern[1:4], []).append((_pattern, _replacement))


def translate(reply: str) -> str:
    for pattern, replacement in _BY_CODE.get(reply[:3], ()):
        if pattern.search(reply):
            return pattern.sub(replacement, reply) if "\\" in replacement else replacement
    return reply
