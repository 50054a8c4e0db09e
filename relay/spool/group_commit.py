"""Group commit: one writer thread, many waiting coroutines, one transaction per batch.

Whatever arrives while a commit is running goes into the next one, so one fsync covers every
item in a batch and the database sees one transaction where the callers had many. Each
caller's future resolves when its own item is durable; if a batch fails, its items are
committed one by one so one bad item never fails its neighbours. Used by the spool (a 250
follows a commit) and by the delivery engine's outcomes (relay/delivery.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class GroupCommitter(Generic[T]):
    def __init__(self, commit: Callable[[list[T]], None], *, batch_max: int, name: str):
        self._commit = commit
        self._batch_max = batch_max
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.on_commit: Callable[[], None] | None = None  # on the loop, after a committed batch

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)

    async def submit(self, item: T) -> None:
        """Returns once item is committed; raises what its commit raised."""
        self.start()  # started on first use, so short-lived users need no set-up
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.put((item, loop, future))
        await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                self._commit([item for item, _, _ in batch])
                outcomes: list[BaseException | None] = [None] * len(batch)
            except Exception as exc:
                # One bad item must not fail the others in its batch: commit them one by one.
                # If the database itself is down, each fails again, quickly.
                outcomes = [exc] if len(batch) == 1 else [self._alone(i) for i, _, _ in batch]
            for (_, loop, future), error in zip(batch, outcomes, strict=True):
                loop.call_soon_threadsafe(_resolve, future, error)
            if any(error is None for error in outcomes) and self.on_commit is not None:
                batch[0][1].call_soon_threadsafe(self.on_commit)

    def _alone(self, item: T) -> BaseException | None:
        try:
            self._commit([item])
            return None
        except Exception as exc:
            return exc


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
