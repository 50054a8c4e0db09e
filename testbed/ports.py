"""Loopback ports for test peers, each handed out at most once per process.

The kernel can give the same ephemeral port to two bind(0) calls in a row once the first
socket is closed. A relay given it for two listeners fails to start (seen in CI: its inbound
listener and its HTTP endpoint both got 45235), so every helper that picks a port records it
here and picks again on a repeat.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_given: set[tuple[str, int]] = set()


def claim(host: str, port: int) -> bool:
    """True the first time (host, port) is claimed in this process, False after."""
    with _lock:
        if (host, port) in _given:
            return False
        _given.add((host, port))
        return True
