"""relay/server.py's Date and Received timestamps: formatted once per second, and exactly what
email.utils.format_datetime writes for the current time."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from unittest import mock

from relay.submission.server import rfc5322_now


def test_is_format_datetime_of_now():
    for _ in range(5):  # a second may turn between the two readings: read again
        before = format_datetime(datetime.now(UTC))
        got = rfc5322_now()
        if format_datetime(datetime.now(UTC)) == before:
            assert got == before
            return
    raise AssertionError("the clock turned a second on every try")


def test_follows_the_clock_second_by_second():
    moments = [1_795_000_000.2, 1_795_000_000.9, 1_795_000_001.0, 1_795_086_400.5]
    with mock.patch("relay.submission.server.time.time", side_effect=moments):
        got = [rfc5322_now() for _ in moments]
    assert got[0] == got[1] == "Wed, 18 Nov 2026 11:06:40 +0000"
    assert got[2] == "Wed, 18 Nov 2026 11:06:41 +0000"
    assert parsedate_to_datetime(got[3]).timestamp() == 1_795_086_400
