"""The submission server: one handle_<VERB> per SMTP verb, each check an early return.

Replies come from relay/replies.py. Blocking work (database reads, password hashes, DKIM
signing) runs in threads; the spool answers only after its commit reached the disk.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import logging
import re
import secrets
import ssl
import time
from base64 import b64decode
from dataclasses import dataclass
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from email.utils import format_datetime, getaddresses
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException

from relay import maillog
from relay.metrics import Metrics
from relay.patches.aiosmtpd import QuietSession
from relay.spool.writer import Spool, SpoolEntry, SpoolUnavailable, new_queue_id
from relay.submission import replies
from relay.submission.auth import LockoutTracker, Principal
from relay.submission.dkim import MalformedMessage, sign
from relay.submission.headers import MessageHeaders
from relay.submission.policy import WOULD_WAIT, PolicyStore
from runbooks.schema import DkimSigningSpec

log = logging.getLogger("axiom.relay")

# RFC 5321 2.3.8: CR and LF occur in DATA only as CRLF. A bare one next to a dot is how SMTP
# smuggling hides a second end-of-data from a receiver that accepts other line ends (SEC
# Consult, Dec 2023). aiosmtpd has already removed dot-stuffing when we see the data, so the
# dot of "\r\n.\n" is gone; refusing every bare CR or LF closes all published variants.
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ROUTED_LOCAL_PART = re.compile(r"[%!]")
_MALFORMED = "553 5.1.3 Error: malformed address"  # aiosmtpd's reply when _getaddr fails
# Client text reaches the database and, echoed, the wire. aiosmtpd decodes invalid UTF-8 to lone
# surrogates, which no driver encodes; PostgreSQL refuses NUL; VARCHAR columns refuse overlong
# values. Any of these in a spool row fails its whole group commit, so they are refused or
# cleaned up front instead of turning into 451s the client would retry forever.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REPLY_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 5321 textstring allows TAB
MAX_ADDRESS = 512  # Message.mail_from and Recipient.address (models/spool.py)
MAX_DOMAIN = 253  # Recipient.domain; also the longest domain name DNS allows
DEFAULT_STREAM = "transactional"
STREAM_HEADER = "x-axiom-stream"
_STREAM_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_CANDIDATE_VALUES = {"1", "yes", "true"}
_BUILTIN_AUTH = ("CRAM-MD5", "LOGIN", "PLAIN")  # aiosmtpd's own auth_* mechanisms
# Messages up to this size are signed on the event loop; larger ones in a thread. Signing is
# CPU work (no I/O): ~0.5 ms for a 2 KB message. In a thread it bought no parallelism (dkimpy
# holds the GIL) and cost two GIL hand-overs per message; signing inline raised the accepted
# rate by 12-28 % (bench/submission.py, side by side). A body of megabytes would stall the
# other sessions for its canonicalisation, so that still goes to a thread.
INLINE_SIGNING_MAX = 64 * 1024


# A path as nearly every client sends it: <dot-atom@domain>, no quotes, comments, spaces or
# address literal. For exactly these the stdlib parser's answer is the text between the
# brackets and what follows them (tests/unit/test_smtp_path.py checks that with hypothesis),
# so they skip it: it was ~6 % of a listener's CPU. Everything else still goes through it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


def parse_path(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """(address, rest) of a MAIL FROM or RCPT TO argument; (None, None) when malformed."""
    # aiosmtpd silently drops an RFC 821 source route (<@relay:user@host>); we refuse it so
    # nobody can steer the path of mail through us.
    if arg.lstrip().startswith("<@"):
        return None, None
    if not arg:
        return "", ""
    simple = _SIMPLE_PATH.match(arg)
    rest = arg[simple.end() :].lstrip(" \t") if simple is not None else ""
    if simple is not None and not rest.startswith("("):  # the stdlib eats a comment too
        addr = simple.group(1)
    else:
        addr, rest = stdlib_path(arg)
        if addr is None:
            return None, None
    if local_part_limit and len(addr.rpartition("@")[0]) > local_part_limit:
        return None, None
    return addr, rest


def stdlib_path(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd's _getaddr, less the typing.Protocol class it defines on every call: that
    class statement was two thirds of the cost of parsing each MAIL and RCPT address."""
    try:
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        try:
            address, rest = parse(arg)
        except HeaderParseError:
            return None, None
        return address.addr_spec, rest
    except (IndexError, AttributeError):
        # Malformed input the stdlib parser trips over instead of raising HeaderParseError:
        # a lone "<" (IndexError), "<0@[0>" (AttributeError, found by tests/unit/
        # test_smtp_path.py). Before, the second one answered 451 4.3.0, retried forever.
        return None, None


def _keeps_help(original):
    """An override of an smtp_* method keeps the HELP text aiosmtpd's @syntax put on it."""

    def decorate(method):
        for name in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if hasattr(original, name):
                setattr(method, name, getattr(original, name))
        return method

    return decorate


def _path_of(arg: str, keyword: str) -> str:
    """The address a MAIL or RCPT argument names, as the client wrote it, for the log."""
    if arg[: len(keyword)].upper() == keyword:
        arg = arg[len(keyword) :]
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        return arg[1:end] if end > 0 else arg
    return arg.split(" ", 1)[0]


# RFC 2920: aiosmtpd reads commands one line at a time from its buffer and answers each in
# order, so a pipelined group is served as if sent one by one. RFC 2034: every reply carries
# an enhanced status code (replies.py; tests/unit/test_replies.py checks).
EHLO_EXTENSIONS = ("250-PIPELINING", "250-ENHANCEDSTATUSCODES")


def with_extensions(responses: list[str]) -> list[str]:
    """aiosmtpd's EHLO lines with ours before the last one ("250 HELP")."""
    return [*responses[:-1], *EHLO_EXTENSIONS, *responses[-1:]]


@dataclass
class RelayContext:
    hostname: str
    policy: PolicyStore
    spool: Spool
    lockout: LockoutTracker
    signing: DkimSigningSpec
    metrics: Metrics
    max_recipients: int
    on_lockout: Any  # callable(client_ip, failures) -> None, writes the audit entry
    max_header_fields: int = 1000
    max_header_field_bytes: int = 102_400  # Postfix's header_size_limit


class SubmissionSMTP(SMTP):
    """aiosmtpd's protocol with our reply texts and stricter address parsing."""

    line_length_limit = 1000  # 998 octets + CRLF (RFC 5321 4.5.3.1.6)

    async def push(self, status):
        if self.transport is None or self.transport.is_closing():
            return  # aiosmtpd goes on with lines it had buffered when it closed the connection
        if isinstance(status, str):
            if self._verb == "MAIL" and status.startswith(_MALFORMED):
                status = replies.BAD_SENDER_ADDRESS  # aiosmtpd says the same for MAIL and RCPT
            status = _clean_text(replies.translate(status), _REPLY_UNSAFE)
            if status[:1] in ("4", "5"):
                await self._push_error(status)
                return
            if status[:1] == "2" and self._verb == "DATA":
                self._errors = 0  # Postfix counts the errors made "without delivering mail"
        await super().push(status)

    async def _push_error(self, status: str) -> None:
        """Every 4xx and 5xx reply counts toward the session's error limit (Postfix's
        smtpd_hard_error_limit): past it the reply is a 421 and the connection closes, so a
        client feeding garbage gets a bounded number of answers instead of one per line."""
        self._errors += 1
        closing = self._errors > self.max_errors
        if closing:
            status = replies.TOO_MANY_ERRORS
        if maillog.enabled():
            self._log_refusal(status)
        await super().push(status)
        if closing and self.transport is not None:
            self.transport.close()

    def _log_refusal(self, reply: str) -> None:
        verb, session = self._verb, self.session
        envelope = self._data_envelope if verb == "DATA" else self.envelope
        sender = envelope.mail_from if envelope is not None else None
        recipients = None
        if verb == "MAIL":
            sender = _path_of(self._verb_arg, "FROM:")
        elif verb == "RCPT":
            recipients = [_path_of(self._verb_arg, "TO:")]
        elif verb == "DATA" and envelope is not None:
            recipients = envelope.rcpt_tos
        principal = session.auth_data if session is not None else None
        maillog.rejected(
            _client_ip(session) if session is not None else "",
            reply,
            tenant=principal.tenant_name if isinstance(principal, Principal) else None,
            user=principal.username if isinstance(principal, Principal) else None,
            command=verb,
            sender=sender,
            recipients=recipients,
        )

    max_errors = 20  # set by make_protocol_factory from SessionLimits
    _errors = 0  # error replies since the session began or last accepted a message
    # The verb being answered and its argument, for the refusal log line (aiosmtpd passes
    # push() only the reply). DATA's envelope is kept: aiosmtpd resets it before the reply.
    _verb: str | None = None
    _verb_arg = ""
    _data_envelope: Envelope | None = None

    @_keeps_help(SMTP.smtp_MAIL)
    async def smtp_MAIL(self, arg: str) -> None:
        self._verb, self._verb_arg = "MAIL", arg or ""
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._verb = None

    @_keeps_help(SMTP.smtp_RCPT)
    async def smtp_RCPT(self, arg: str) -> None:
        self._verb, self._verb_arg = "RCPT", arg or ""
        try:
            await super().smtp_RCPT(arg)
        finally:
            self._verb = None

    @_keeps_help(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        self._verb, self._data_envelope = "DATA", self.envelope
        try:
            await super().smtp_DATA(arg)
        finally:
            self._verb = self._data_envelope = None

    @_keeps_help(SMTP.smtp_AUTH)
    async def smtp_AUTH(self, arg: str) -> None:
        self._verb = "AUTH"
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._verb = None

    async def handle_exception(self, error: Exception) -> str:
        if self.transport is None or self.transport.is_closing():
            # A read or write on a connection already closed (QUIT, lockout, too many bogus
            # commands) while aiosmtpd drains lines it had buffered: no internal error.
            log.debug("after close: %r", error)
            return replies.INTERNAL_ERROR.format(ref="closed")  # push() drops it
        return await super().handle_exception(error)

    limits: SessionLimits  # set by make_protocol_factory
    _refusal: str | None = None
    _counted_ip: str | None = None
    _session_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        first = self._original_transport is None  # STARTTLS calls this again with TLS
        super().connection_made(transport)
        if self.session.ssl is None and transport.get_extra_info("ssl_object") is not None:
            self.session.ssl = {"implicit": True}  # implicit TLS: encrypted from the first byte
        if not first:
            return
        ip = _client_ip(self.session)
        if not self.limits.connections.admit(ip):
            self._refusal = replies.TOO_MANY_CONNECTIONS
            return
        self._counted_ip = ip
        # The idle timeout restarts with every command; this one does not, so a client that
        # trickles bytes (slowloris) is still dropped.
        self._session_deadline = self.loop.call_later(
            self.limits.max_session_seconds, self._session_expired
        )

    def connection_lost(self, error) -> None:
        if self._counted_ip is not None:
            self.limits.connections.release(self._counted_ip)
            self._counted_ip = None
        if self._session_deadline is not None:
            self._session_deadline.cancel()
        super().connection_lost(error)

    def eof_received(self):
        keep_open = super().eof_received()
        # aiosmtpd cancels its handler task here and leaves closing the transport to that
        # task's CancelledError handler. Under uvloop a client that closes at once can have
        # its EOF read in the same loop iteration as connection_made: the task is cancelled
        # before its first step, that handler never runs, and the half-open connection
        # stayed forever with its slot of max_connections_per_client (found when the relay
        # moved to uvloop: three such clients locked their address out). The client has
        # stopped sending and the handler is gone, so close (buffered replies still go out).
        self.loop.call_soon(self._close_after_eof)
        return keep_open

    def _close_after_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _handle_client(self):
        if self._refusal is not None:
            await self.push(self._refusal)
            self.transport.close()
            return
        await super()._handle_client()

    def _session_expired(self) -> None:
        self._say_and_close(replies.SESSION_TOO_LONG)

    def _timeout_cb(self) -> None:
        self._say_and_close(replies.IDLE_TIMEOUT)

    def _say_and_close(self, reply: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.transport.write(reply.encode() + b"\r\n")
            self.transport.close()

    # The private methods of aiosmtpd's SMTP overridden here are listed, with why, in
    # relay/patches/aiosmtpd.py; tests/unit/test_patches.py fails if aiosmtpd stops calling one.
    def _getaddr(self, arg: str):
        return parse_path(arg, self.local_part_limit)

    def _create_session(self) -> Session:
        return QuietSession(self.loop)  # no "login_data is deprecated" warning on every AUTH


def _clean_text(value: str, unsafe: re.Pattern[str] = _CONTROL) -> str:
    """Invalid UTF-8 (lone surrogates) and control characters become '?'."""
    return unsafe.sub("?", value.encode("utf-8", "replace").decode("utf-8"))


def _well_formed(address: str, limit: int = MAX_ADDRESS) -> bool:
    return len(address) <= limit and address == _clean_text(address)


class ConnectionCounter:
    """Open connections per client address, shared by both listeners of one process."""

    def __init__(self, per_client: int):
        self._per_client = per_client
        self._open: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        if self._open.get(ip, 0) >= self._per_client:
            return False
        self._open[ip] = self._open.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        left = self._open.get(ip, 0) - 1
        if left > 0:
            self._open[ip] = left
        else:
            self._open.pop(ip, None)


@dataclass(frozen=True)
class SessionLimits:
    connections: ConnectionCounter
    max_session_seconds: float
    max_errors: int = 20  # AXIOM_MAX_SESSION_ERRORS


def _client_ip(session: Session) -> str:
    peer = session.peer
    return peer[0] if isinstance(peer, tuple) else str(peer)


async def _challenge(server: SMTP, prompt: str):
    """aiosmtpd's challenge_auth, with an over-long answer line refused like an over-long
    command: asyncio's readline drops the line and raises ValueError there, which became a
    451 internal error (found by test_fuzz). The client gets 500 5.5.2 and AUTH ends."""
    try:
        return await server.challenge_auth(prompt)
    except ValueError as error:
        if "limit" not in str(error):
            raise
        await server.push(replies.LINE_TOO_LONG)
        return MISSING


class SubmissionHandler:
    def __init__(self, ctx: RelayContext):
        self.ctx = ctx

    # --- AUTH (RFC 4954); handler auth_* methods replace aiosmtpd's synchronous ones ---
    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await _challenge(server, "")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push(replies.AUTH_BAD_PLAIN)
            return AuthResult(success=False, handled=True)
        return await self._verify(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            username = await _challenge(server, "Username:")
            if username is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                username = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        password = await _challenge(server, "Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._verify(server, username, password)

    async def _verify(self, server: SMTP, username: bytes, password: bytes) -> AuthResult:
        ip = _client_ip(server.session)
        if self.ctx.lockout.is_locked(ip):
            await server.push(replies.AUTH_LOCKED_OUT)
            server.transport.close()
            return AuthResult(success=False, handled=True)
        principal = None
        if b"\0" not in username:  # PostgreSQL cannot even compare a NUL-bearing name
            principal = await asyncio.to_thread(self.ctx.policy.authenticate, username, password)
        if principal is None:
            self.ctx.metrics.auth_failures.inc()
            if maillog.enabled():
                maillog.auth(ip, username.decode("utf-8", "backslashreplace")[:200], ok=False)
            if self.ctx.lockout.record_failure(ip):
                await asyncio.to_thread(self.ctx.on_lockout, ip)
                await server.push(replies.AUTH_LOCKED_OUT)
                server.transport.close()
                return AuthResult(success=False, handled=True)
            return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)
        self.ctx.lockout.record_success(ip)
        maillog.auth(ip, principal.username, ok=True)
        return AuthResult(success=True, auth_data=principal, message=replies.AUTH_OK)

    # --- EHLO: aiosmtpd's lines plus the extensions the protocol implements ---
    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        return with_extensions(responses)

    # --- MAIL ---
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options
    ) -> str:
        principal = await self._principal(session)
        if principal is None:
            return self._reject("auth_required", replies.AUTH_REQUIRED)
        if await self._ask(self.ctx.policy.tenant_paused, principal.tenant_id):
            return self._reject("tenant_paused", replies.TENANT_PAUSED)
        if address == "<>" or not address:
            return self._reject("null_sender", replies.SENDER_NULL_NOT_ALLOWED)
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or not _well_formed(address):
            return self._reject("bad_sender", replies.BAD_SENDER_ADDRESS)
        if not await self._ask(self.ctx.policy.may_send_as, principal, domain):
            return self._reject(
                "sender_domain", replies.SENDER_DOMAIN_NOT_ALLOWED.format(domain=domain.lower())
            )
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    # --- RCPT ---
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options
    ) -> str:
        principal = await self._principal(session)
        if principal is None:
            return self._reject("relay_denied", replies.RELAY_DENIED)
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or "." not in domain.strip("."):
            return self._reject("bad_recipient", replies.BAD_ADDRESS)
        if not _well_formed(address) or len(domain) > MAX_DOMAIN:
            return self._reject("bad_recipient", replies.BAD_ADDRESS)
        if _ROUTED_LOCAL_PART.search(local.strip('"')):
            return self._reject("routed_recipient", replies.ROUTED_ADDRESS)
        if len(envelope.rcpt_tos) >= self.ctx.max_recipients:
            return self._reject("too_many_recipients", replies.TOO_MANY_RECIPIENTS)
        reason = await self._ask(self.ctx.policy.suppression_reason, principal.tenant_id, address)
        if reason is not None:
            return self._reject(
                "suppressed", replies.RECIPIENT_SUPPRESSED.format(address=address, reason=reason)
            )
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    # --- DATA ---
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        principal = await self._principal(session)
        if principal is None:  # unreachable through aiosmtpd's ordering; kept as a guard
            return self._reject("relay_denied", replies.RELAY_DENIED)
        raw: bytes = envelope.original_content or b""
        headers = screen_data(raw, self.ctx.max_header_fields, self.ctx.max_header_field_bytes)
        if isinstance(headers, Refusal):
            return self._reject(headers.reason, headers.reply)

        from_values = headers.values("from")
        addresses = getaddresses(from_values) if len(from_values) == 1 else []
        if len(addresses) != 1 or "@" not in addresses[0][1]:
            return self._reject("header_from", replies.HEADER_FROM_MISSING)
        from_domain = addresses[0][1].rpartition("@")[2].lower().rstrip(">")
        if not _well_formed(from_domain, MAX_DOMAIN) or not await self._ask(
            self.ctx.policy.may_send_as, principal, from_domain
        ):
            return self._reject(
                "header_from", replies.HEADER_FROM_NOT_ALLOWED.format(domain=from_domain)
            )

        stream_values = headers.values(STREAM_HEADER)
        stream = stream_values[0].strip().lower() if stream_values else DEFAULT_STREAM
        if not _STREAM_NAME.match(stream):
            stream = DEFAULT_STREAM
        headers.remove(STREAM_HEADER)  # an instruction to us, not for the recipient
        # The customer marks an engaged recipient for warming IPs and domains; also ours only.
        candidate_values = headers.values(_candidate_header())
        candidate = bool(candidate_values) and candidate_values[0].lower() in _CANDIDATE_VALUES
        headers.remove(_candidate_header())

        queue_id = new_queue_id()
        if not headers.values("message-id"):
            headers.append("Message-ID", f"<{queue_id}@{self.ctx.hostname}>")
        if not headers.values("date"):
            headers.append("Date", rfc5322_now())
        headers.prepend("Received", self._received(session, queue_id))

        keys = await self._ask(self.ctx.policy.signing_keys, from_domain)
        if not keys:
            return self._reject("no_key", replies.NO_SIGNING_KEY.format(domain=from_domain))
        unsigned = headers.to_bytes()
        try:
            if len(unsigned) <= INLINE_SIGNING_MAX:
                signatures = sign(unsigned, keys, self.ctx.signing)
            else:
                signatures = await asyncio.get_running_loop().run_in_executor(
                    None, sign, unsigned, keys, self.ctx.signing
                )
        except MalformedMessage as exc:  # found by the fuzzer: a 451 here was retried forever
            return self._reject(
                "malformed_header", replies.MALFORMED_HEADER.format(detail=str(exc)[:200])
            )
        entry = SpoolEntry(
            queue_id=queue_id,
            tenant_id=principal.tenant_id,
            stream=stream,
            mail_from=envelope.mail_from,
            recipients=list(envelope.rcpt_tos),
            header_from_domain=from_domain,
            message_id_header=_clean_text((headers.values("message-id") or [""])[0].strip())[:998],
            data=signatures + unsigned,
            client_address=_client_ip(session),
            auth_user=principal.username,
            warmup_candidate=candidate,
        )
        started = asyncio.get_running_loop().time()
        try:
            await self.ctx.spool.put(entry)
        except SpoolUnavailable as exc:
            log.error("spool commit failed: %s", exc)
            return self._reject("spool_unavailable", replies.SPOOL_UNAVAILABLE)
        self.ctx.metrics.spool_latency.observe(asyncio.get_running_loop().time() - started)
        self.ctx.metrics.accepted.inc()
        maillog.queued(
            entry.client_address,
            queue_id,
            entry.mail_from,
            entry.recipients,
            tenant=principal.tenant_name,
            user=principal.username,
        )
        return replies.QUEUED.format(queue_id=queue_id)

    async def handle_exception(self, error: Exception) -> str:
        return exception_reply(error, self.ctx.metrics.rejected)

    # --- helpers ---
    async def _principal(self, session: Session) -> Principal | None:
        if isinstance(session.auth_data, Principal):
            return session.auth_data
        bound = await self._ask(self.ctx.policy.principal_for_network, _client_ip(session))
        if bound is not None:
            session.auth_data = bound  # one lookup per connection
        return bound

    @staticmethod
    async def _ask(question, *args):
        """A policy answer: inline when the policy has it at once (a cache hit, or a SQLite
        point read that takes no lock), else from a thread, since the database read blocks."""
        answer = question(*args, without_waiting=True)
        if answer is WOULD_WAIT:
            answer = await asyncio.to_thread(question, *args)
        return answer

    def _received(self, session: Session, queue_id: str) -> str:
        # RFC 3848 protocol types: ESMTPSA = ESMTP + TLS + AUTH.
        proto = "ESMTP"
        if session.ssl:
            proto += "S"
        if session.authenticated:
            proto += "A"
        helo = _clean_text(session.host_name or "unknown").replace("(", "").replace(")", "")[:200]
        return (
            f"from {helo} ([{_client_ip(session)}])\r\n\tby {self.ctx.hostname} (Axiom Send)"
            f" with {proto} id {queue_id};\r\n\t{rfc5322_now()}"
        )

    def _reject(self, reason: str, reply: str) -> str:
        self.ctx.metrics.rejected.labels(reason=reason).inc()
        return reply


@dataclass(frozen=True)
class Refusal:
    reason: str  # the metric label
    reply: str


def has_bare_cr_or_lf(raw: bytes) -> bool:
    """Whether raw holds a CR not followed by LF or an LF not preceded by CR. Counted in C
    (three scans) instead of the regex _BARE_CR_OR_LF, which tested every byte in Python's
    regex engine: when there are as many CRs and LFs as CRLFs, every one is part of a CRLF."""
    crlf = raw.count(b"\r\n")
    return not (raw.count(b"\r") == crlf == raw.count(b"\n"))


def screen_data(raw: bytes, max_fields: int, max_field_bytes: int) -> MessageHeaders | Refusal:
    """The checks every listener makes of DATA before reading it: NUL, line ends, header
    limits."""
    if b"\0" in raw:  # one memchr; a receiver that drops NULs would see "\r\n\0.\r\n" as the end
        return Refusal("nul", replies.NUL_IN_DATA)
    if has_bare_cr_or_lf(raw):
        return Refusal("bare_cr_lf", replies.BARE_CR_OR_LF)
    headers = MessageHeaders.parse(raw)
    if len(headers.fields) > max_fields:
        return Refusal("header_limit", replies.TOO_MANY_HEADERS.format(limit=max_fields))
    if any(len(f) > max_field_bytes for f in headers.fields):
        return Refusal("header_limit", replies.HEADER_TOO_LARGE.format(limit=max_field_bytes))
    return headers


def exception_reply(error: Exception, rejected) -> str:
    """A handler's answer to an exception; rejected: a Counter labelled by reason."""
    if isinstance(error, TLSSetupException):
        # The client failed its STARTTLS handshake (a prober, a broken client): no internal
        # error of ours, and aiosmtpd closes the connection without sending a reply.
        log.info("STARTTLS handshake failed: %s", error.__cause__)
        rejected.labels(reason="tls_handshake").inc()
        return replies.TLS_HANDSHAKE_FAILED
    ref = secrets.token_hex(4)
    log.exception("internal error ref=%s", ref, exc_info=error)
    rejected.labels(reason="internal_error").inc()
    return replies.INTERNAL_ERROR.format(ref=ref)


@functools.lru_cache(maxsize=2)
def _rfc5322_date(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def rfc5322_now() -> str:
    """The current time as a Date or Received header writes it ("Thu, 26 Nov 2026 18:00:00
    +0000"). The format has whole seconds, so it is formatted once per second, not once per
    header (email.utils.format_datetime was ~1 % of a listener's time)."""
    return _rfc5322_date(int(time.time()))


def make_protocol_factory(
    handler: SubmissionHandler,
    *,
    hostname: str,
    data_size_limit: int,
    starttls_context: ssl.SSLContext | None,
    implicit_tls: bool,
    limits: SessionLimits,
    idle_timeout: float = 300,
    commands_per_session: int = 1000,
    offer_auth: bool = True,
):
    """One SMTP protocol per connection. On the implicit-TLS listener the transport is already
    encrypted, so AUTH needs no STARTTLS there. offer_auth=False (the inbound listener): no
    mechanism is offered; the handler drops the empty AUTH line from its EHLO answer."""

    def factory() -> SubmissionSMTP:
        protocol = SubmissionSMTP(
            handler,
            hostname=hostname,
            ident="Axiom Send",
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            tls_context=None if implicit_tls else starttls_context,
            require_starttls=False,  # bound-network tenants may submit in plaintext
            auth_require_tls=offer_auth and not implicit_tls,
            auth_exclude_mechanism=["CRAM-MD5"] if offer_auth else list(_BUILTIN_AUTH),
            timeout=idle_timeout,
            # aiosmtpd counts each verb separately and answers 421 4.7.0 past the limit.
            command_call_limit=commands_per_session,
        )
        protocol.limits = limits
        protocol.max_errors = limits.max_errors
        return protocol

    return factory


@functools.cache
def _candidate_header() -> str:
    """The warm-up candidate header's name (runbooks/ip-warmup.yaml), read once."""
    from runbooks.loader import ip_warmup

    return ip_warmup().spec.candidate_header.lower()
