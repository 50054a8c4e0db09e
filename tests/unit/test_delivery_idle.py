"""The delivery loop's idle wait leaves no task behind. It used to leave one pending
`stop.wait()` (or `wake.wait()`) task per idle spell, about one per message under steady load:
the soak in `make bench` saw the relay's RSS grow ~2 MB/min at 70 msg/s."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from relay.delivery.engine import DeliveryEngine


class _IdlePool:
    async def reap(self) -> None:
        pass

    async def close_all(self) -> None:
        pass


def _idle_engine(cls=DeliveryEngine):
    """An engine whose spool never has work: only the loop's waiting is exercised."""
    engine = object.__new__(cls)
    engine.wake = asyncio.Event()
    engine.spec = SimpleNamespace(lease_seconds=3600)
    engine.pool = _IdlePool()
    engine._held, engine._tasks = set(), set()
    engine.outcomes = SimpleNamespace(stop=lambda: None)  # nothing to settle

    async def run_once() -> int:
        return 0

    engine.run_once = run_once
    return engine


async def _pending_tasks_after_idle_spells(cls=DeliveryEngine) -> tuple[int, int]:
    engine = _idle_engine(cls)
    stop = asyncio.Event()
    runner = asyncio.create_task(engine.run(stop, idle_poll=0.005))
    await asyncio.sleep(0.05)
    before = len(asyncio.all_tasks())
    for _ in range(100):  # woken by new mail...
        engine.wake.set()
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.3)  # ...and timing out with nothing to do
    after = len(asyncio.all_tasks())
    stop.set()
    await asyncio.wait_for(runner, 5)
    return before, after


def test_idle_wait_leaves_no_pending_task():
    before, after = asyncio.run(_pending_tasks_after_idle_spells())
    assert after <= before + 2, f"{after - before} tasks left pending by idle waits"
