"""Loopback ports for test peers: each from this process's own range, each handed out once.

Two ways a port picked for a peer was found taken when the peer bound it, both seen in CI:
- bind(0) asks the kernel for an ephemeral port, and the kernel can give the same one to two
  bind(0) calls in a row once the first socket is closed (a relay given 45235 for its inbound
  listener and its HTTP endpoint); and the same range serves every outgoing connection, so a
  client's local port can take a picked port before its server binds it;
- the two pytest-xdist workers pick at the same time, each unaware of the other.
So ports come from below the kernel's ephemeral range (32768-60999 here; read from /proc), the
range split evenly between the xdist workers (PYTEST_XDIST_WORKER gwN of
PYTEST_XDIST_WORKER_COUNT), walked in order from a random start and checked free by binding.
A port is handed out once per walk of the range (thousands of picks before it comes back).
"""

from __future__ import annotations

import os
import random
import socket
import threading

LOW = 10_000  # above the well-known and registered services the machine runs (5432, 6379, …)

_lock = threading.Lock()
_given: set[tuple[str, int]] = set()
_next: dict[str, int] = {}


def claim(host: str, port: int) -> bool:
    """True the first time (host, port) is claimed in this walk of the range, False after."""
    with _lock:
        if (host, port) in _given:
            return False
        _given.add((host, port))
        return True


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def own_range() -> range:
    """This process's share of [LOW, the ephemeral range's start)."""
    high = _ephemeral_low()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not worker.startswith("gw") or count < 1:
        return range(LOW, high)
    index = int(worker[2:]) % count
    size = (high - LOW) // count
    return range(LOW + index * size, LOW + (index + 1) * size)


def _free(host: str, port: int, udp: bool) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def pick(host: str, *, udp: bool = False) -> int:
    """A port free on host now (for TCP, and UDP too when asked) from this process's range,
    not handed out before in this walk of it."""
    ports = own_range()
    for _walk in range(2):
        with _lock:
            start = _next.get(host)
            if start is None:
                start = ports.start + random.SystemRandom().randrange(len(ports))
        for step in range(len(ports)):
            port = ports.start + (start - ports.start + step) % len(ports)
            if (host, port) in _given or not _free(host, port, udp):
                continue
            if claim(host, port):
                with _lock:
                    _next[host] = port + 1 if port + 1 < ports.stop else ports.start
                return port
        with _lock:  # every port of the range handed out once: begin a new walk
            for taken in [k for k in _given if k[0] == host]:
                _given.discard(taken)
    raise RuntimeError(f"no free port on {host} in {ports.start}-{ports.stop - 1}")
