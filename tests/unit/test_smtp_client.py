"""relay/patches/aiosmtplib.py: the remembered and short-cut aiosmtplib helpers answer exactly as
aiosmtplib's own."""

from __future__ import annotations

import aiosmtplib.protocol
import aiosmtplib.smtp
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.patches import aiosmtplib as smtp_client
from tests.examples import examples
from tests.patching import patched


@pytest.fixture(autouse=True, scope="module")
def relay_patches():
    with patched("aiosmtplib"):
        yield


def test_the_shims_are_what_aiosmtplib_calls():
    assert aiosmtplib.smtp.quote_address is smtp_client.quote_address
    assert aiosmtplib.protocol.normalize_message_line_endings is (
        smtp_client.normalize_message_line_endings
    )


@settings(max_examples=examples(2000), deadline=None)
@given(st.binary(max_size=60) | st.text("a.\r\n", max_size=60).map(str.encode))
@example(b"a\r\nb\r\n")
@example(b"a\r\nb")
@example(b"a\rb\r\n")
@example(b"a\nb\r\n")
@example(b"\r\r\n\n")
@example(b"")
def test_line_ends_are_normalised_exactly_as_aiosmtplib_does(message):
    assert smtp_client.normalize_message_line_endings(message) == smtp_client._normalize(message)


@pytest.mark.parametrize(
    "address",
    [
        "shop@acme.example",
        "Shop <shop@acme.example>",
        " spaced@x.example ",
        '"a b"@x.example',
        "",
        "bad\r\nRCPT TO:<x@y.example>",  # aiosmtplib refuses control characters later
    ],
)
def test_quoted_addresses_equal_aiosmtplibs_twice_over(address):
    for _ in range(2):  # the second answer comes from the cache
        assert smtp_client.quote_address(address) == smtp_client._quote_address(address)
