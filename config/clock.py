"""Time as a dependency, so multi-day procedures (retries, expiry, warm-up) test in seconds.

Production runs on `SystemClock`. The sandbox runs on an `OffsetClock`: the system clock plus
an offset that `axiom sandbox clock advance 1d` moves. The offset is shared by every process
(relay, delivery nodes, the simulated world, flows, CLI) through the database — the one thing
they all share, on one machine or several (models/sandbox_clock.py owns the table and the
factory `clock_for`). Timeouts and leases measured with `time.monotonic()` stay real time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

log = logging.getLogger("axiom.clock")
OFFSET_READ_SECONDS = 1.0  # an advance reaches every process within about this long


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: datetime | None = None):
        self._now = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


class OffsetClock:
    """The system clock shifted by an offset that another process may change at any time.

    `now()` is on the relay's hot path (every claim, every choice of source IP), so it costs a
    monotonic-time check and an addition; the offset is read (`read_offset`, a database query)
    at most once per OFFSET_READ_SECONDS. An asyncio process calls `follow()` as a task: the
    read then happens in a worker thread once a second and `now()` never touches the database
    from the event loop. A failed read keeps the last offset (the clock must not stop time).
    """

    def __init__(self, read_offset: Callable[[], float], every: float = OFFSET_READ_SECONDS):
        self._read_offset = read_offset
        self._every = every
        self._offset = timedelta(0)
        self._read_at = -1e18  # monotonic; far in the past: the first now() reads
        self._followed = False

    @property
    def offset_seconds(self) -> float:
        return self._offset.total_seconds()

    def now(self) -> datetime:
        if not self._followed and time.monotonic() - self._read_at >= self._every:
            self.refresh()
        return datetime.now(UTC) + self._offset

    def timestamp(self) -> float:
        """now() as seconds since the epoch, for code that keeps time as floats."""
        return self.now().timestamp()

    def refresh(self) -> None:
        """Read the shared offset now (blocking: call it from a thread in async code)."""
        try:
            seconds = float(self._read_offset())
        except Exception as exc:  # the database briefly unreachable, a table not migrated yet
            log.debug("sandbox clock offset not readable: %s", exc)
        else:
            self._offset = timedelta(seconds=seconds)
        self._read_at = time.monotonic()

    async def follow(self) -> None:
        """Keep the offset fresh from a worker thread until cancelled (asyncio processes)."""
        await asyncio.to_thread(self.refresh)
        self._followed = True
        try:
            while True:
                await asyncio.sleep(self._every)
                await asyncio.to_thread(self.refresh)
        finally:
            self._followed = False


def parse_duration(text: str) -> float:
    """Seconds in '90s', '15m', '3h', '1d', '2w' or a bare number of seconds; ValueError else."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in units else "s"
    number = value[:-1] if value[-1:] in units else value
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 3h, 1d, 2w)") from None
    if seconds != seconds or abs(seconds) == float("inf"):
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 3h, 1d, 2w)")
    return seconds
