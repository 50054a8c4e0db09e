"""relay/pipelining.py against a scripted SMTP server on loopback: replies in one segment or
trickled a byte at a time, multi-line replies, a receiver that hangs up or goes silent, the
lone dot of RFC 2920 3.1, and the out-of-sequence check that keeps a desynchronised 503 from
bouncing anyone."""

from __future__ import annotations

import asyncio

import aiosmtplib
import aiosmtplib.protocol
import pytest
from aiosmtplib.response import SMTPResponse
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.pipelining import (
    PipeliningProtocol,
    RepliesOutOfSequence,
    check_sequence,
    dot_stuffed,
)
from tests.patching import patched


@pytest.fixture(autouse=True, scope="module")
def relay_patches():
    with patched("aiosmtplib"):  # aiosmtplib.SMTP builds a PipeliningProtocol
        yield


EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class Script:
    """A server that greets, answers EHLO, then reads until it has seen `expect` and sends
    `answer` (split into `chunk`-byte writes, each drained, when chunk is set); `after` maps
    further input it waits for to the answer it sends. Records everything it received."""

    def __init__(self, expect: bytes, answer: bytes, chunk: int = 0, after=(), close=False):
        self.expect, self.answer, self.chunk = expect, answer, chunk
        self.after = list(after)
        self.close = close
        self.received = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.test ESMTP\r\n")
        await reader.readuntil(b"\r\n")
        writer.write(EHLO)
        for expect, answer in [(self.expect, self.answer), *self.after]:
            while expect not in self.received:
                data = await reader.read(4096)
                if not data:
                    return
                self.received += data
            if self.close and expect == self.expect:
                writer.write(answer)
                await writer.drain()
                writer.close()
                return
            if self.chunk:
                for i in range(0, len(answer), self.chunk):
                    writer.write(answer[i : i + self.chunk])
                    await writer.drain()
                    await asyncio.sleep(0.002)
            else:
                writer.write(answer)
        await reader.read()  # until the client hangs up


async def _session(script: Script):
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5.0, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    return server, smtp


GROUP = [b"MAIL FROM:<shop@acme.example>", b"RCPT TO:<a@x.test>", b"RCPT TO:<b@x.test>", b"DATA"]
REPLIES = (
    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 no such user\r\n550 5.1.1 really\r\n"
    b"354 End data with <CR><LF>.<CR><LF>\r\n"
)


@pytest.mark.parametrize("chunk", [0, 1, 7])
async def test_a_group_goes_out_in_one_write_and_its_replies_come_back_in_order(chunk):
    body = b"Subject: hi\r\n\r\n.leading dot\r\nbye\r\n"
    script = Script(
        b"DATA\r\n", REPLIES, chunk, after=[(b"\r\n.\r\n", b"250 2.0.0 queued as X1\r\n")]
    )
    server, smtp = await _session(script)
    try:
        assert isinstance(smtp.protocol, PipeliningProtocol)
        assert smtp.supports_extension("pipelining")
        got = await smtp.protocol.execute_pipelined(GROUP, reply_timeout=5)
        assert [(r.code, r.message) for r in got] == [
            (250, "2.1.0 Ok"),
            (250, "2.1.5 Ok"),
            (550, "5.1.1 no such user\n5.1.1 really"),
            (354, "End data with <CR><LF>.<CR><LF>"),
        ]
        final = await smtp.protocol.send_body(body, reply_timeout=5)
        assert (final.code, final.message) == (250, "2.0.0 queued as X1")
        # the whole group arrived before the server said anything about it
        assert script.received.startswith(b"".join(c + b"\r\n" for c in GROUP))
        assert script.received.endswith(b"..leading dot\r\nbye\r\n.\r\n")  # dot-stuffed
    finally:
        smtp.close()
        server.close()


async def test_the_lone_dot_ends_data_nobody_will_send():
    replies = b"250 Ok\r\n550 5.1.1 no\r\n354 go ahead\r\n"
    script = Script(
        b"DATA\r\n", replies, after=[(b"DATA\r\n.\r\n", b"554 5.5.1 no valid recipients\r\n")]
    )
    server, smtp = await _session(script)
    try:
        got = await smtp.protocol.execute_pipelined([*GROUP[:2], b"DATA"], reply_timeout=5)
        assert [r.code for r in got] == [250, 550, 354]
        end = await smtp.protocol.send_lone_dot(reply_timeout=5)
        assert end.code == 554
        assert script.received.endswith(b"DATA\r\n.\r\n")
    finally:
        smtp.close()
        server.close()


@pytest.mark.parametrize(
    ("close", "reply_timeout", "error"),
    [
        (True, 5, aiosmtplib.SMTPServerDisconnected),  # hangs up after one reply of four
        (False, 0.5, aiosmtplib.SMTPTimeoutError),  # one reply of four, then silence
    ],
)
async def test_a_group_left_unanswered_fails_as_a_lost_session_or_a_timeout(
    close, reply_timeout, error
):
    script = Script(b"DATA\r\n", b"250 2.1.0 Ok\r\n", close=close)
    server, smtp = await _session(script)
    try:
        with pytest.raises(error):
            await smtp.protocol.execute_pipelined(GROUP, reply_timeout=reply_timeout)
    finally:
        smtp.close()
        server.close()


async def test_a_control_character_in_a_command_is_refused_before_anything_is_sent():
    script = Script(b"DATA\r\n", REPLIES)
    server, smtp = await _session(script)
    try:
        with pytest.raises(ValueError, match="prohibited control character"):
            await smtp.protocol.execute_pipelined(
                [b"MAIL FROM:<a@b>", b"RCPT TO:<x@y>\r\nRSET", b"DATA"], reply_timeout=1
            )
        await asyncio.sleep(0.05)
        assert b"MAIL" not in script.received
    finally:
        smtp.close()
        server.close()


def _r(code: int) -> SMTPResponse:
    return SMTPResponse(code, "text")


@pytest.mark.parametrize(
    ("mail", "rcpts", "data", "desync"),
    [
        (250, [250], 354, False),
        (250, [550, 250], 354, False),
        (250, [550], 503, False),  # no recipient: DATA's 503 is in sequence
        (550, [503], 503, False),  # MAIL refused: the rest follow from it
        (452, [503, 503], 503, False),
        (503, [250], 354, True),  # a fresh transaction cannot be out of sequence
        (250, [503], 503, True),  # RCPT after an accepted MAIL
        (250, [250, 550], 503, True),  # DATA after an accepted RCPT
        (250, [251], 503, True),
    ],
)
def test_replies_out_of_sequence_are_recognised(mail, rcpts, data, desync):
    if desync:
        with pytest.raises(RepliesOutOfSequence, match="pipelined replies out of sequence"):
            check_sequence(_r(mail), [_r(c) for c in rcpts], _r(data))
    else:
        check_sequence(_r(mail), [_r(c) for c in rcpts], _r(data))


@given(
    st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b" "]), max_size=40).map(
        b"".join
    )
)
def test_dot_stuffing_equals_aiosmtplibs(message):
    assert dot_stuffed(message) == aiosmtplib.protocol.PERIOD_REGEX.sub(b"..", message)
