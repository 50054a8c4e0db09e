"""relay/shaping.py: per-path rates from a window counted per second, with bounded memory."""

from __future__ import annotations

from relay.delivery.shaping import PathGate
from runbooks.schema_delivery import PathLimits


class Clock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def gate(clock: Clock, **limits) -> PathGate:
    return PathGate(PathLimits(max_connections=5, messages_per_connection=100, **limits), clock)


def test_no_limit_no_wait():
    clock = Clock()
    g = gate(clock)
    g.record_send(10_000)
    assert g.delay_for_next() == 0


def test_per_minute_waits_until_the_oldest_counted_send_leaves_the_window():
    clock = Clock(1_000.25)
    g = gate(clock, per_minute=3)
    g.record_send()  # second 1000
    clock.now = 1_010.5
    g.record_send(2)  # second 1010
    assert g.delay_for_next() == 1_000 + 1 + 60 - 1_010.5  # 50.5 s: second 1000 leaves at 1061
    clock.now = 1_061.0
    assert g.delay_for_next() == 0
    g.record_send()  # second 1061: 3 in the window again (1010 ×2, 1061)
    assert g.delay_for_next() == 1_010 + 1 + 60 - 1_061.0  # 10 s


def test_a_throttle_lowers_the_rate_while_it_lasts():
    clock = Clock()
    g = gate(clock, per_minute=100)
    g.record_send(5)
    assert g.delay_for_next() == 0
    assert g.delay_for_next(throttle_per_minute=5) == 1_000 + 1 + 60 - clock.now


def test_per_hour_limit_counts_the_whole_hour():
    clock = Clock(0.0)
    g = gate(clock, per_hour=10)
    for minute in range(10):
        clock.now = minute * 60.0
        g.record_send()
    clock.now = 600.0
    assert g.delay_for_next() == 0 + 1 + 3600 - 600.0
    clock.now = 3_601.0
    assert g.delay_for_next() == 0  # the first send has left the hour


def test_never_sooner_than_exact_send_times_would_allow():
    clock = Clock(0.0)
    g = gate(clock, per_minute=60)
    exact = []
    for i in range(600):  # ten minutes at 1 msg/s in uneven steps
        clock.now = i * 0.997
        exact.append(clock.now)
        g.record_send()
        recent = [t for t in exact if t > clock.now - 60]
        exact_wait = recent[-60] + 60 - clock.now if len(recent) >= 60 else 0.0
        wait = g.delay_for_next()
        assert exact_wait <= wait <= exact_wait + 1


def test_memory_is_one_entry_per_second_of_the_last_hour():
    clock = Clock(0.0)
    g = gate(clock, per_minute=1_000_000)
    for i in range(2 * 3600 * 10):  # two hours at 10 msg/s
        clock.now = i / 10
        g.record_send()
        if i % 1000 == 0:
            g.delay_for_next()
    g.delay_for_next()
    assert len(g._sent) <= 3_602
    assert sum(count for _, count in g._sent) <= 3_602 * 10
