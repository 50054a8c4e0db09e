"""relay/patches: the start-up version check, explicit installation, and that each library still
calls every private method we override and looks up every name we replace.

Each test of an override drives the library itself (an aiosmtpd session on loopback, an
aiosmtplib send, dkimpy's DKIM.sign) with a spy on our code, so that a library release which
renames or stops calling the method fails here instead of silently dropping our behaviour
(e.g. the refusal of source routes, which lives in _getaddr).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib import metadata
from unittest import mock

import aiosmtpd.smtp
import aiosmtplib
import aiosmtplib.protocol
import aiosmtplib.smtp
import dkim
import dkim.canonicalization
import pytest
from aiosmtpd.smtp import AuthResult
from packaging.specifiers import SpecifierSet

from relay import patches
from relay.delivery.pipelining import PipeliningProtocol
from relay.patches import aiosmtpd as aiosmtpd_patches
from relay.patches import aiosmtplib as aiosmtplib_patches
from relay.patches import dkimpy as dkimpy_patches
from relay.submission import replies
from relay.submission.dkim import generate_key, load_signing_key, sign
from relay.submission.server import (
    ConnectionCounter,
    SessionLimits,
    SubmissionSMTP,
    make_protocol_factory,
)
from runbooks.loader import dkim_signing
from tests.patching import assert_published_dkimpy, patched, published_dkimpy

# --- the version check and installation ---


def test_the_installed_libraries_are_the_tested_versions():
    patches.check_versions()  # what `axiom relay` does first
    for name in patches.LIBRARIES:
        module = {m.DISTRIBUTION: m for m in (dkimpy_patches, aiosmtpd_patches, aiosmtplib_patches)}
        assert metadata.version(name) in SpecifierSet(module[name].TESTED)


def test_an_untested_version_stops_start_up_with_one_line(capsys):
    real = metadata.version

    def version(name):
        return "6.0.1" if name == "aiosmtplib" else real(name)

    with mock.patch.object(metadata, "version", version):
        with pytest.raises(patches.PatchVersionError) as raised:
            patches.install_all()
        assert str(raised.value) == (
            "aiosmtplib 6.0.1 is not a version relay/patches/aiosmtplib.py was tested with "
            f"({aiosmtplib_patches.TESTED})"
        )
        with pytest.raises(SystemExit) as exited:
            patches.install_all_or_exit()
    assert str(exited.value) == f"error: {raised.value}"
    assert "\n" not in str(exited.value)
    assert patches.installed() == [], "nothing may be installed when the check fails"


def test_importing_installs_nothing_and_install_all_is_explicit_and_idempotent():
    assert patches.installed() == []  # every module above is imported by now
    assert_published_dkimpy()
    try:
        patches.install_all()
        patches.install_all()
        assert patches.installed() == ["dkimpy", "aiosmtpd", "aiosmtplib"]
        assert dkim.rfc822_parse is dkimpy_patches._rfc822_parse
        assert aiosmtplib.smtp.SMTPProtocol is PipeliningProtocol
        assert aiosmtpd.smtp.sanitized_log is aiosmtpd_patches._sanitized_log
        with pytest.raises(AssertionError, match="rfc822_parse"):
            assert_published_dkimpy()  # what guards the tests' verifiers
    finally:
        patches.uninstall_all()
    assert patches.installed() == []
    assert_published_dkimpy()
    assert "dir" not in vars(aiosmtpd.smtp)
    assert aiosmtplib.smtp.SMTPProtocol is aiosmtplib.protocol.SMTPProtocol


def test_signing_refuses_to_run_without_the_patches():
    rsa = generate_key("rsa", 1024)
    key = load_signing_key("acme.example", "s", "rsa", rsa.private_material)
    with pytest.raises(RuntimeError, match="install_all"):
        sign(b"From: a@acme.example\r\n\r\nx\r\n", [key], dkim_signing().spec)


# --- aiosmtpd: the private methods SubmissionSMTP overrides, and the module globals ---


class Handler:
    """AUTH PLAIN and EHLO only: aiosmtpd's defaults answer everything else."""

    async def auth_PLAIN(self, server, args):
        return AuthResult(success=True, auth_data="someone")

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses


@asynccontextmanager
async def listening(per_client: int = 5, idle_timeout: float = 30):
    factory = make_protocol_factory(
        Handler(),
        hostname="mx.test",
        data_size_limit=1 << 20,
        starttls_context=None,
        implicit_tls=True,  # AUTH without STARTTLS, over a plain loopback socket
        limits=SessionLimits(ConnectionCounter(per_client), 60),
        idle_timeout=idle_timeout,
    )
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


async def read_reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
        if not line:
            break
        lines.append(line.rstrip("\r\n"))
        if line[3:4] != "-":
            break
    return "\n".join(lines)


async def converse(address, *commands: str) -> list[str]:
    """The banner, then one reply per command."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        answers = [await read_reply(reader)]
        for command in commands:
            writer.write(command.encode() + b"\r\n")
            answers.append(await read_reply(reader))
        return answers
    finally:
        writer.close()


def spy(cls, name):
    return mock.patch.object(cls, name, autospec=True, side_effect=getattr(cls, name))


async def test_aiosmtpd_parses_mail_and_rcpt_paths_through_our_getaddr():
    async with listening() as address:
        with spy(SubmissionSMTP, "_getaddr") as getaddr:
            answers = await converse(
                address,
                "EHLO client.test",
                "MAIL FROM:<@relay.test:shop@acme.example>",
                "MAIL FROM:<shop@acme.example>",
                "RCPT TO:<ann@gmail.com>",
            )
    called = [c.args[1] for c in getaddr.call_args_list]
    assert called == ["<@relay.test:shop@acme.example>", "<shop@acme.example>", "<ann@gmail.com>"]
    assert answers[2] == replies.BAD_SENDER_ADDRESS, "a source route is refused, not dropped"
    assert answers[3].startswith("250 ") and answers[4].startswith("250 ")


async def test_aiosmtpd_serves_each_connection_through_our_handle_client():
    async with listening(per_client=0) as address:  # every connection is over the limit
        with spy(SubmissionSMTP, "_handle_client") as handle_client:
            reader, writer = await asyncio.open_connection(*address)
            first = await read_reply(reader)
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
    assert handle_client.call_count == 1
    assert first == replies.TOO_MANY_CONNECTIONS
    assert rest == b"", "the refused connection is closed"


async def test_aiosmtpd_idle_timeout_goes_through_our_timeout_cb():
    async with listening(idle_timeout=0.2) as address:
        with spy(SubmissionSMTP, "_timeout_cb") as timeout_cb:
            reader, writer = await asyncio.open_connection(*address)
            banner = await read_reply(reader)
            said = await asyncio.wait_for(reader.read(), 10)
            writer.close()
    assert banner.startswith("220 ")
    assert timeout_cb.call_count == 1
    assert said == replies.IDLE_TIMEOUT.encode() + b"\r\n"


async def test_auth_logs_no_login_data_deprecation_through_our_create_session(caplog):
    async with listening() as address:
        with (
            spy(SubmissionSMTP, "_create_session") as create_session,
            caplog.at_level(logging.WARNING, logger="mail.log"),
        ):
            answers = await converse(address, "EHLO client.test", "AUTH PLAIN AHNvbWVvbmUAc2VjcmV0")
    assert create_session.call_count == 1
    assert answers[2].startswith("235 ")
    assert "login_data" not in caplog.text
    # the warning is aiosmtpd's own, on its Session: this is what the override avoids
    with caplog.at_level(logging.WARNING, logger="mail.log"):
        aiosmtpd.smtp.Session(None).login_data = "x"
    assert "Session.login_data is deprecated" in caplog.text


async def test_aiosmtpd_builds_its_tables_and_logs_commands_through_the_installed_globals():
    with patched("aiosmtpd"):
        shim = aiosmtpd.smtp.inspect
        with (
            mock.patch.object(shim, "getmembers", wraps=shim.getmembers) as getmembers,
            mock.patch.object(shim, "signature", wraps=shim.signature) as signature,
            mock.patch.object(aiosmtpd.smtp, "dir", wraps=aiosmtpd.smtp.dir) as dir_,
            mock.patch.object(
                aiosmtpd.smtp, "sanitized_log", wraps=aiosmtpd.smtp.sanitized_log
            ) as sanitized_log,
        ):
            async with listening() as address:
                answers = await converse(address, "EHLO client.test", "NOOP")
    assert answers[2].startswith("250 ")
    assert getmembers.called and dir_.called and signature.called
    assert sanitized_log.called


# --- aiosmtplib: the protocol class and the helpers it looks up at send time ---


class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok"


async def test_aiosmtplib_sends_through_our_protocol_quoting_and_line_end_check():
    server = await asyncio.get_running_loop().create_server(
        lambda: aiosmtpd.smtp.SMTP(Sink(), hostname="mx.test"), "127.0.0.1", 0
    )
    host, port = server.sockets[0].getsockname()[:2]
    message = b"From: shop@acme.example\r\n\r\nShipped.\r\n"
    try:
        with (
            patched("aiosmtplib"),
            mock.patch.object(
                aiosmtplib.smtp, "quote_address", wraps=aiosmtplib.smtp.quote_address
            ) as quote,
            mock.patch.object(
                aiosmtplib.protocol,
                "normalize_message_line_endings",
                wraps=aiosmtplib.protocol.normalize_message_line_endings,
            ) as normalize,
        ):
            client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False)
            await client.connect()
            assert isinstance(client.protocol, PipeliningProtocol)
            await client.sendmail("shop@acme.example", ["ann@gmail.com"], message)
            await client.quit()
    finally:
        server.close()
        await server.wait_closed()
    assert [c.args[0] for c in quote.call_args_list] == ["shop@acme.example", "ann@gmail.com"]
    assert normalize.call_args.args[0] == message


# --- dkimpy: every name we replace is looked up while DKIM.sign runs ---


@pytest.mark.parametrize(
    ("namespace", "name"),
    [
        (dkim, "rfc822_parse"),
        (dkim, "parse_pem_private_key"),
        (dkim, "RSASSA_PKCS1_v1_5_sign"),
        (dkim.canonicalization, "compress_whitespace"),
        (dkim.canonicalization, "strip_trailing_whitespace"),
        (dkim.canonicalization, "unfold_header_value"),
    ],
)
def test_dkimpy_signs_through_each_replaced_function(namespace, name):
    rsa = generate_key("rsa", 1024)
    key = load_signing_key("acme.example", "s", "rsa", rsa.private_material)
    message = b"From: a@acme.example\r\nSubject:  folded\r\n  twice \r\n\r\nbody  \t\r\n"
    with patched("dkimpy"):
        ours = getattr(namespace, name)
        with mock.patch.object(namespace, name, wraps=ours) as replaced:
            dkim.DKIM(message).sign(
                b"s", b"acme.example", key.private, canonicalize=(b"relaxed", b"relaxed")
            )
    assert replaced.called, f"dkimpy no longer calls {namespace.__name__}.{name}"


def test_dkimpy_signs_through_our_policy_and_nacl():
    ed = generate_key("ed25519")
    key = load_signing_key("acme.example", "e", "ed25519", ed.private_material)
    message = b"From: a@acme.example\r\n\r\nbody\r\n"
    with (
        patched("dkimpy"),
        mock.patch.object(
            dkimpy_patches._RememberingPolicy,
            "canonicalize_body",
            autospec=True,
            side_effect=dkimpy_patches._RememberingPolicy.canonicalize_body,
        ) as body,
        mock.patch.object(
            dkimpy_patches, "_ed25519_signing_key", wraps=dkimpy_patches._ed25519_signing_key
        ) as signing_key,
    ):
        signed = sign(message, [key], dkim_signing().spec) + message
    assert body.called, "dkimpy no longer builds dkim.CanonicalizationPolicy"
    assert signing_key.called, "dkimpy no longer builds its key from dkim.nacl.signing"
    with published_dkimpy():
        record = f"v=DKIM1; k=ed25519; p={ed.public_value}".encode()
        assert dkim.DKIM(signed).verify(dnsfunc=lambda name, timeout=5: record)
