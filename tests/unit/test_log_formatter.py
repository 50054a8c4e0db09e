"""relay.service.LogFormatter writes what logging.Formatter(LOG_FORMAT) writes, byte for byte:
across second boundaries, out of order, with arguments, exceptions and stack information."""

from __future__ import annotations

import logging
import random
import sys

from relay.service import LOG_FORMAT, LogFormatter


def _record(created: float, *, exc_info=None, stack_info=None, args=None) -> logging.LogRecord:
    record = logging.LogRecord(
        "axiom.maillog",
        logging.INFO,
        "(unknown file)",
        0,
        "sent %s" if args else "plain",
        args,
        exc_info,
        sinfo=stack_info,
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_the_same_text_as_the_standard_formatter():
    reference, ours = logging.Formatter(LOG_FORMAT), LogFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    rnd = random.Random(5)
    start = 1_767_000_000.0
    times = [start + i * step for i in range(300) for step in (0.0004, 0.37, 0.999)]
    times += [rnd.uniform(0, 2e9) for _ in range(300)]  # out of order, far apart
    for i, created in enumerate(times):
        kwargs = {"args": ("x",)} if i % 3 == 0 else {}
        if i % 50 == 0:
            kwargs["exc_info"] = exc_info
        if i % 70 == 0:
            kwargs["stack_info"] = "Stack (most recent call last):\n  here"
        # a record each: formatters cache the message and traceback text on it
        assert ours.format(_record(created, **kwargs)) == reference.format(
            _record(created, **kwargs)
        )


def test_a_date_format_goes_to_the_standard_formatter():
    record = _record(1_767_000_000.25)
    assert LogFormatter().formatTime(record, "%H:%M") == logging.Formatter().formatTime(
        record, "%H:%M"
    )
