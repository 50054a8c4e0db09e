"""testbed/ports.py: test peers' ports come from below the ephemeral range, split between the
xdist workers, never twice in a walk."""

from __future__ import annotations

import socket

from testbed import ports


def test_the_workers_share_the_range_without_overlap(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    got = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        got.append(ports.own_range())
    first, second = got
    assert first.start == ports.LOW and first.stop == second.start
    assert second.stop <= ports._ephemeral_low()
    assert len(first) == len(second) > 1000


def test_outside_xdist_the_whole_range_is_ours(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert ports.own_range() == range(ports.LOW, ports._ephemeral_low())


def test_a_picked_port_is_free_in_range_and_not_given_again():
    host = "127.0.0.77"
    picked = [ports.pick(host) for _ in range(50)]
    assert len(set(picked)) == 50
    assert all(p in ports.own_range() for p in picked)
    with socket.socket() as s:
        s.bind((host, picked[0]))  # free indeed


def test_a_port_in_use_is_skipped():
    host = "127.0.0.78"
    first = ports.pick(host)
    with socket.socket() as busy:
        busy.bind((host, first + 1 if first + 1 in ports.own_range() else first - 1))
        taken = busy.getsockname()[1]
        ports._next[host] = taken  # the walk reaches it next
        assert ports.pick(host) != taken
