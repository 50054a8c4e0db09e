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
        self._sent: deque[float] = deque()  # send times within the last hour

    def delay_for_next(self, throttle_per_minute: int | None = None) -> float:
        """Seconds until one more message may be sent on this path (0 = now)."""
        now = self._clock()
        while self._sent and self._sent[0] <= now - 3600:
            self._sent.popleft()
        waits = [0.0]
        per_minute = min(
            (v for v in (self.limits.per_minute, throttle_per_minute) if v), default=None
        )
        if per_minute is not None:
            recent = [t for t in self._sent if t > now - 60]
            if len(recent) >= per_minute:
                waits.append(recent[-per_minute] + 60 - now)
        if self.limits.per_hour is not None and len(self._sent) >= self.limits.per_hour:
            waits.append(self._sent[-self.limits.per_hour] + 3600 - now)
        return max(waits)

    def record_send(self, count: int = 1) -> None:
        now = self._clock()
        self._sent.extend([now] * count)


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
