"""SMTP command pipelining (RFC 2920) for aiosmtplib, which sends one command and waits.

A delivery without pipelining costs four round trips: MAIL, RCPT, DATA (354), then the body.
Each is a write, a wake-up and a read on both ends; under load that was 29 % of the delivering
process's time in SMTPProtocol.write alone (py-spy, bench/end_to_end.py). A receiver that
advertises PIPELINING lets the client send MAIL, every RCPT and DATA in one write and read the
replies in order (RFC 2920 3.1: DATA is the last command of the group, because the body may
only follow a 354). Postfix's smtp client does this against the same sink in the benchmark.

aiosmtplib cannot read several replies to one write: its protocol hands one parsed reply to
one waiter and drops data that arrives while that reply waits to be picked up (see
SMTPProtocol.data_received). PipeliningProtocol adds a batch mode that parses every complete
reply in the buffer into the batch, in order, however the bytes are split across segments.
Outside a batch it is aiosmtplib's protocol unchanged; relay/patches/aiosmtplib.py installs it
as the protocol aiosmtplib.SMTP builds. Receivers that do not advertise PIPELINING get
aiosmtplib's command-by-command exchange (relay/delivery/engine.py decides).

RFC 2920 obligations kept here: the group ends with DATA; when DATA is answered 354 although
every RCPT was refused, the client sends the lone terminating dot (there is nothing to send and
the receiver is waiting for data); a 421 anywhere ends the session.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiosmtplib.protocol as _protocol
from aiosmtplib.errors import (
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.response import SMTPResponse

_Base = _protocol.SMTPProtocol
BAD_SEQUENCE = 503


class RepliesOutOfSequence(SMTPServerDisconnected):
    """A pipelined group's replies contradict each other: the receiver answered commands out
    of order (smtp-sink with delayed replies answers RCPT "503 need MAIL" before MAIL's 250).
    The replies cannot be trusted to belong to their commands, least of all a 5xx that would
    bounce a recipient, so the session is given up as if it were lost: the attempt is
    transient and the relay remembers not to pipeline to that receiver."""


def dot_stuffed(message: bytes) -> bytes:
    """aiosmtplib's dot-stuffing (a "." more before every line that starts with one), without
    running its regex over the whole message when no line starts with a dot."""
    if message.startswith(b".") or b"\n." in message:
        return _protocol.PERIOD_REGEX.sub(b"..", message)
    return message


def check_sequence(mail: SMTPResponse, rcpts: list[SMTPResponse], data: SMTPResponse) -> None:
    """Raise RepliesOutOfSequence when a 503 (bad sequence of commands) answers a command
    whose predecessor in the group succeeded: MAIL opens a fresh transaction (the session
    is clean or was RSET), RCPT follows a MAIL answered 250, DATA follows an accepted RCPT."""
    accepted = mail.code == 250 and any(r.code in (250, 251) for r in rcpts)
    if (
        mail.code == BAD_SEQUENCE
        or (mail.code == 250 and any(r.code == BAD_SEQUENCE for r in rcpts))
        or (accepted and data.code == BAD_SEQUENCE)
    ):
        got = "; ".join(f"{r.code} {r.message}" for r in [mail, *rcpts, data])
        raise RepliesOutOfSequence(f"pipelined replies out of sequence: {got}")


@dataclass
class _Batch:
    expected: int
    future: asyncio.Future
    replies: list[SMTPResponse] = field(default_factory=list)


class PipeliningProtocol(_Base):
    """aiosmtplib's SMTPProtocol plus execute_pipelined() and send_body()."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batch: _Batch | None = None

    # --- receiving ---
    def data_received(self, data: bytes) -> None:
        batch = self._batch
        if batch is None:
            super().data_received(data)
            return
        if batch.future.done():
            return  # failed already (too long, malformed); the session is being given up
        self._buffer.extend(data)
        try:
            while len(batch.replies) < batch.expected:
                reply = self._read_response_from_buffer()
                if reply is None:
                    break
                batch.replies.append(reply)
        except Exception as exc:  # a malformed or over-long line
            del self._buffer[:]
            self._fail(batch, exc)
            return
        if len(batch.replies) == batch.expected:
            batch.future.set_result(batch.replies)
        elif len(self._buffer) > _protocol.MAX_RESPONSE_LENGTH:
            del self._buffer[:]
            self._fail(
                batch,
                SMTPResponseException(
                    _protocol.SMTPStatus.invalid_response.value, "Response too long"
                ),
            )

    def _fail(self, batch: _Batch, exc: BaseException) -> None:
        if not batch.future.done():
            batch.future.set_exception(exc)
            batch.future.exception()  # retrieved: nobody may await it (see aiosmtplib)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._batch is not None:
            lost = SMTPServerDisconnected("Connection lost")
            lost.__cause__ = exc
            self._fail(self._batch, lost)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        if self._batch is not None:
            self._fail(self._batch, SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    # --- sending ---
    async def execute_pipelined(
        self, commands: list[bytes], reply_timeout: float | None = None
    ) -> list[SMTPResponse]:
        """Write every command (each without its CRLF) at once; their replies, in order."""
        for command in commands:
            if _protocol.COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command arg contains a prohibited control character")
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            batch = _Batch(len(commands), self._loop.create_future())
            self._batch = batch
            try:
                self.write(b"".join(c + b"\r\n" for c in commands))
                try:
                    return await asyncio.wait_for(batch.future, reply_timeout)
                except TimeoutError as exc:
                    raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
            finally:
                self._batch = None
                self._response_pending = False

    async def send_body(self, message: bytes, reply_timeout: float | None = None) -> SMTPResponse:
        """After a 354: the message, dot-stuffed and terminated; the final reply."""
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        message = dot_stuffed(_protocol.normalize_message_line_endings(message)) + b".\r\n"
        async with self._command_lock:
            self._response_pending = True
            self.write(message)
            return await self.read_response(timeout=reply_timeout)

    async def send_lone_dot(self, reply_timeout: float | None = None) -> SMTPResponse:
        """After a 354 with no recipient accepted (RFC 2920 3.1): end the empty data."""
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            self._response_pending = True
            self.write(b".\r\n")
            return await self.read_response(timeout=reply_timeout)
