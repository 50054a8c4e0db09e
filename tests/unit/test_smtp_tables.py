"""relay/patches/aiosmtpd.py: aiosmtpd builds the same method tables from the per-class cache."""

from __future__ import annotations

import asyncio
import builtins
import inspect
from unittest import mock

import aiosmtpd.smtp as aiosmtpd_smtp
import pytest

from relay.inbound.listener import InboundHandler
from relay.patches import aiosmtpd as smtp_tables
from relay.submission.server import SubmissionHandler, SubmissionSMTP
from tests.patching import patched


@pytest.fixture(autouse=True, scope="module")
def relay_patches():
    with patched("aiosmtpd"):
        yield


def tables(handler) -> dict:
    loop = asyncio.new_event_loop()
    try:
        protocol = SubmissionSMTP(
            handler, hostname="t.test", auth_exclude_mechanism=["CRAM-MD5"], loop=loop
        )
        return {
            "auth": {
                name: (
                    attr.method.__func__,
                    "protocol" if attr.method.__self__ is protocol else attr.method.__self__,
                    attr.is_builtin,
                )
                for name, attr in protocol._auth_methods.items()
            },
            "hooks": {
                name: (hook.__func__, hook.__self__)
                for name, hook in protocol._handle_hooks.items()
            },
            "verbs": {
                name: (m.__func__, m.__self__ is protocol)
                for name, m in protocol._smtp_methods.items()
            },
            "ehlo": protocol._ehlo_hook_ver,
        }
    finally:
        loop.close()


def with_stdlib(handler) -> dict:
    """aiosmtpd as shipped: the real inspect module and builtin dir()."""
    with (
        mock.patch.object(aiosmtpd_smtp, "inspect", inspect),
        mock.patch.object(aiosmtpd_smtp, "dir", builtins.dir, create=True),
    ):
        return tables(handler)


def test_installed_by_install_and_idempotent():
    assert isinstance(aiosmtpd_smtp.inspect, smtp_tables._Inspect)
    smtp_tables.install()  # idempotent
    assert isinstance(aiosmtpd_smtp.inspect, smtp_tables._Inspect)
    assert aiosmtpd_smtp.inspect.isawaitable is inspect.isawaitable  # everything else delegated


def test_submission_handler_tables_equal_aiosmtpd_own():
    handler = SubmissionHandler(ctx=None)
    cached = tables(handler)
    assert cached == with_stdlib(handler)
    # Our handler's AUTH methods replace the built-in ones; the verbs are bound per connection.
    assert cached["auth"]["PLAIN"][0] is SubmissionHandler.auth_PLAIN
    assert cached["auth"]["PLAIN"][2] is False
    assert "CRAM-MD5" not in cached["auth"]
    assert {"MAIL", "RCPT", "DATA"} <= cached["hooks"].keys()
    assert {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS", "AUTH", "QUIT"} <= cached["verbs"].keys()


def test_inbound_handler_tables_equal_aiosmtpd_own():
    handler = InboundHandler(ctx=None)
    assert tables(handler) == with_stdlib(handler)


def test_each_connection_gets_methods_bound_to_itself():
    handler = SubmissionHandler(ctx=None)
    first, second = tables(handler), tables(handler)
    assert first["hooks"]["DATA"][1] is handler
    loop = asyncio.new_event_loop()
    try:
        a = SubmissionSMTP(handler, hostname="t.test", loop=loop)
        b = SubmissionSMTP(handler, hostname="t.test", loop=loop)
    finally:
        loop.close()
    assert a._smtp_methods["MAIL"].__self__ is a
    assert b._smtp_methods["MAIL"].__self__ is b
    assert first == second


def test_an_instance_attribute_is_seen_like_dir_sees_it():
    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

    handler = Handler()

    async def handle_NOOP(server, session, envelope, arg):  # set on the instance only
        return "250 OK"

    handler.handle_NOOP = handle_NOOP
    assert smtp_tables._dir(handler) == [n for n in dir(handler) if n.startswith("handle_")]
    loop = asyncio.new_event_loop()
    try:
        protocol = SubmissionSMTP(handler, hostname="t.test", loop=loop)
    finally:
        loop.close()
    assert protocol._handle_hooks["NOOP"] is handle_NOOP


def test_command_logging_is_skipped_when_discarded_and_still_masks_auth_when_written(caplog):
    import logging

    log = logging.getLogger("mail.log")
    line = b"AUTH PLAIN dXNlcgB1c2VyAHNlY3JldA==\r\n"
    with mock.patch.object(aiosmtpd_smtp, "sanitize", wraps=aiosmtpd_smtp.sanitize) as spy:
        with caplog.at_level(logging.WARNING, logger="mail.log"):
            aiosmtpd_smtp.sanitized_log(log.info, "%r >> %r", "peer", line)
        assert spy.call_count == 0  # discarded: not even sanitised
        assert caplog.records == []
        with caplog.at_level(logging.INFO, logger="mail.log"):
            aiosmtpd_smtp.sanitized_log(log.info, "%r >> %r", "peer", line)
        assert spy.call_count == 1
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "********" in text and "dXNlcgB1c2VyAHNlY3JldA" not in text
