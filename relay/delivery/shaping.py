"""Pacing per (source IP, provider) path: connection slots and message rates.

Each path has its own gate, so a slow or throttled receiver holds only its own slots and
never delays mail to anyone else. A provider's limits hold across all of its MX hosts; the
receivers no provider entry claims (the fallback provider) are each a path of their own, keyed
by their site (their MX host names), or one tarpit would take the slots of every one of them.
Limits come from runbooks/shaping.yaml; an active throttle (a protective reaction) lowers the
per-minute rate while it lasts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from runbooks.schema_delivery import PathLimits


class PathGate:
    def __init__(self, limits: PathLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.connections = asyncio.Semaphore(limits.max_connections)
        self.available = asyncio.Event()  # set when a session is released or closed
        self._clock = clock
        # Sends of the last hour counted per whole second, oldest first: [second, count].
        # At most 3,601 entries per path whatever the rate. (One timestamp per message, as
        # before, grew ~0.6 MB/min at 290 msg/s for an hour, and every send scanned them all.)
        self._sent: deque[list[int]] = deque()

    def delay_for_next(self, throttle_per_minute: int | None = None) -> float:
        """Seconds until one more message may be sent on this path (0 = now).

        A second's sends count as sent at its end, so a wait is at most a second longer than
        with exact send times, never shorter."""
        now = self._clock()
        while self._sent and self._sent[0][0] + 1 <= now - 3600:
            self._sent.popleft()
        waits = [0.0]
        per_minute = min(
            (v for v in (self.limits.per_minute, throttle_per_minute) if v), default=None
        )
        if per_minute is not None:
            waits.append(self._wait(now, per_minute, 60))
        if self.limits.per_hour is not None:
            waits.append(self._wait(now, self.limits.per_hour, 3600))
        return max(waits)

    def _wait(self, now: float, limit: int, window: int) -> float:
        """Until the limit-th most recent send of the window leaves it (0: under the limit)."""
        seen = 0
        for second, count in reversed(self._sent):
            if second + 1 <= now - window:
                break
            seen += count
            if seen >= limit:
                return max(0.0, second + 1 + window - now)
        return 0.0

    def record_send(self, count: int = 1) -> None:
        if count <= 0:
            return
        second = math.floor(self._clock())
        if self._sent and self._sent[-1][0] == second:
            self._sent[-1][1] += count
        else:
            self._sent.append([second, count])


class Shaper:
    def __init__(self, limits_for: Callable[[str], PathLimits]):
        self._limits_for = limits_for
        self._gates: dict[tuple[str, str, str | None], PathGate] = {}

    def gate(self, source_ip: str, provider: str, site: str | None = None) -> PathGate:
        """site: the receiving site, for the fallback provider's receivers; else None."""
        key = (source_ip, provider, site)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = PathGate(self._limits_for(provider))
        return gate
