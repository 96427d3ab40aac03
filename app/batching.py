"""Dynamic batching: concurrent requests become single engine runs.

Knows nothing of images or HTTP: it batches opaque payloads for a synchronous ``run_batch``
function, run in worker threads so the event loop stays free.

Policy. A batch closes when it holds ``max_batch_size`` items, or ``max_delay_s`` after its first
item was queued, or at once when no engine run is in flight: waiting for company only pays
while the engine is busy anyway, so a lone request on an idle engine never waits. Under load the
queue fills while runs are in flight, and batches form by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from app.errors import DeadlineExceeded, EngineFailure, NotReady, Overloaded

log = logging.getLogger("dfine.batching")

P = TypeVar("P")
R = TypeVar("R")
DropReason = Literal["cancelled", "expired"]


class BatchObserver(Protocol):
    """Receives the batcher's events (metrics)."""

    def queue_changed(self, depth: int) -> None: ...
    def inflight_changed(self, batches: int) -> None: ...
    def batch_started(self, size: int, queue_waits_s: list[float]) -> None: ...
    def batch_finished(self, size: int, run_s: float, ok: bool) -> None: ...
    def dropped(self, reason: DropReason) -> None: ...


class NullObserver:
    def queue_changed(self, depth: int) -> None:
        pass

    def inflight_changed(self, batches: int) -> None:
        pass

    def batch_started(self, size: int, queue_waits_s: list[float]) -> None:
        pass

    def batch_finished(self, size: int, run_s: float, ok: bool) -> None:
        pass

    def dropped(self, reason: DropReason) -> None:
        pass


@dataclass(eq=False)
class _Item(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float
    started: bool = field(default=False)


class DynamicBatcher(Generic[P, R]):
    def __init__(
        self,
        run_batch: Callable[[list[P]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        instances: int = 1,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.instances = instances
        self._observer: BatchObserver = observer or NullObserver()
        self._clock = clock
        self._queue: deque[_Item[P, R]] = deque()
        self._inflight = 0
        self._changed = asyncio.Event()  # an item arrived or a run finished
        self._slots = asyncio.Semaphore(instances)
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="engine")
        self._loop_task: asyncio.Task[None] | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def submit(self, payload: P, timeout_s: float) -> R:
        """Queue one payload and wait for its result.

        Raises Overloaded when the queue is full, NotReady when draining, DeadlineExceeded when
        ``timeout_s`` passes before its batch starts, EngineFailure when its batch fails.
        """
        if self._closed:
            raise NotReady()
        if len(self._queue) >= self.max_queue:
            raise Overloaded(retry_after_s=max(1, round(self.max_delay_s + 1)))
        now = self._clock()
        item: _Item[P, R] = _Item(payload, asyncio.get_running_loop().create_future(), now,
                                  now + timeout_s)
        self._queue.append(item)
        self._observer.queue_changed(len(self._queue))
        self._changed.set()
        try:
            done, _ = await asyncio.wait({item.future}, timeout=timeout_s)
        except asyncio.CancelledError:  # the client went away
            self._abandon(item, "cancelled")
            raise
        if not done and not item.started:
            self._abandon(item, "expired")
            raise DeadlineExceeded()
        return await item.future  # started: its batch is running, so wait for the result

    def _abandon(self, item: _Item[P, R], reason: DropReason) -> None:
        if item.started:
            return  # already running: its result will be dropped
        item.future.cancel()
        with contextlib.suppress(ValueError):  # it may sit in a batch being collected
            self._queue.remove(item)
            self._observer.queue_changed(len(self._queue))
        self._observer.dropped(reason)

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._collect()
            if not batch:
                self._slots.release()
                continue
            self._inflight += 1
            self._observer.inflight_changed(self._inflight)
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    async def _collect(self) -> list[_Item[P, R]]:
        while not self._queue:
            self._changed.clear()
            await self._changed.wait()
        close_at = self._queue[0].enqueued_at + self.max_delay_s
        batch: list[_Item[P, R]] = []
        while True:
            while self._queue and len(batch) < self.max_batch_size:
                batch.append(self._queue.popleft())
            self._observer.queue_changed(len(self._queue))
            remaining = close_at - self._clock()
            if len(batch) >= self.max_batch_size or self._inflight == 0 or remaining <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        # Drop what was cancelled or expired meanwhile; no await from here to ``started``.
        now = self._clock()
        ready = []
        for item in batch:
            if item.future.done():
                continue
            if now >= item.deadline:
                item.future.set_exception(DeadlineExceeded())
                self._observer.dropped("expired")
                continue
            item.started = True
            ready.append(item)
        return ready

    async def _run(self, batch: list[_Item[P, R]]) -> None:
        started = self._clock()
        self._observer.batch_started(len(batch), [started - i.enqueued_at for i in batch])
        ok = False
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, [i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            ok = True
        except Exception:
            log.exception("engine run failed; failing its %d request(s)", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(EngineFailure())
        else:
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            self._inflight -= 1
            self._observer.inflight_changed(self._inflight)
            self._observer.batch_finished(len(batch), self._clock() - started, ok)
            self._slots.release()
            self._changed.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new items, then wait until the queued and running ones are done.
        Returns False if ``timeout_s`` passed first."""
        self._closed = True
        deadline = self._clock() + timeout_s
        while self._queue or self._inflight:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))
        return True

    async def stop(self) -> None:
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(NotReady())
        self._queue.clear()
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
