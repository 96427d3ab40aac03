"""Dynamic batching: concurrent requests become single engine runs.

Knows nothing of images or HTTP: it batches opaque payloads for a synchronous ``run_batch``
function. ``instances`` engine threads take batches from the queue themselves and run them, so
an engine never waits for a busy event loop between two runs (that wait left the cores idle
about a tenth of the time under load); results go back to the loop with call_soon_threadsafe.

Policy. A batch closes when it holds ``max_batch_size`` items, or ``max_delay_s`` after its first
item was queued, or at once when no engine run is in flight: waiting for company only pays
while the engine is busy anyway, so a lone request on an idle engine never waits. Under load the
queue fills while runs are in flight, and batches form by themselves. With ``batch_sizes`` (the
engine's buckets), a batch takes the largest size the queue fills and leaves the rest for the
next, so that no run is padded while items wait, until warm-up has timed the buckets: then
the split that costs least by those timings (BatchPlanner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from app.errors import DeadlineExceeded, EngineFailure, NotReady, Overloaded
from app.threads import name_os_thread

log = logging.getLogger("dfine.batching")

P = TypeVar("P")
R = TypeVar("R")
T = TypeVar("T")
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


class BatchPlanner:
    """How many of the queued items the next batch takes, given what a run of each batch size
    costs (the engine's buckets, timed at warm-up).

    The queue is served at the least total cost: with cost(b) the time of a run of bucket b,
    the cheapest way to serve n items is min over b of cost(b) + cheapest(n - b), a run padded
    where b > n. The next batch is the largest bucket in that cheapest plan. On a GPU one padded
    run of 32 can cost less than 16 + 8 + 4 + 2 + 1 (D-FINE-L 640: 80 ms against ~115 ms);
    without timings every item costs the same, which fills buckets exactly: the largest bucket
    the queue fills, the rest left for the next batch, fewer than the smallest all taken.
    """

    def __init__(self, costs: dict[int, float] | None, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.costs = dict(costs or {})
        self._cheapest = [0.0]  # cheapest[n]: least total cost of serving n items
        self._first = [0]  # first[n]: the batch that cheapest plan starts with

    @classmethod
    def linear(cls, sizes: tuple[int, ...] | None, max_batch_size: int) -> BatchPlanner:
        """A planner for ``sizes`` before they are timed: a run costs its size."""
        return cls({size: float(size) for size in sizes or ()}, max_batch_size)

    def take(self, available: int) -> int:
        count = min(available, self.max_batch_size) if not self.costs else available
        if not self.costs or count <= 0:
            return count
        while len(self._cheapest) <= count:
            self._extend()
        return min(self._first[count], count, self.max_batch_size)

    def _extend(self) -> None:
        n = len(self._cheapest)
        best_cost, best_size = float("inf"), 0
        for size in sorted(self.costs, reverse=True):  # ties go to the larger batch
            cost = self.costs[size] + self._cheapest[max(0, n - size)]
            if cost < best_cost - 1e-12:
                best_cost, best_size = cost, size
        self._cheapest.append(best_cost)
        self._first.append(best_size)


@dataclass(eq=False)
class _Run(Generic[P, R]):
    batch: list[_Item[P, R]]
    started: float
    abandoned: bool = False  # cut off by the watchdog; its thread leaves when it returns


@dataclass(eq=False)
class _Item(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float
    started: bool = field(default=False)  # taken into a batch; guarded by the batcher's lock
    abandoned: bool = field(default=False)  # its waiter gave up (cancelled or expired)


async def all_or_none(jobs: Iterable[Awaitable[T]]) -> list[T]:
    """Every job's result; when one fails, the others are cancelled (a decode not started yet
    never starts, a queued image leaves the queue) and waited for, so that their places are
    held until they are gone, and the first failure is raised."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class DynamicBatcher(Generic[P, R]):
    def __init__(
        self,
        run_batch: Callable[[list[P]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        instances: int = 1,
        batch_sizes: tuple[int, ...] | None = None,
        run_timeout_s: float | None = None,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.instances = instances
        self.planner = BatchPlanner.linear(batch_sizes, max_batch_size)
        self.run_timeout_s = run_timeout_s
        self._observer: BatchObserver = observer or NullObserver()
        self._clock = clock
        self._queue: deque[_Item[P, R]] = deque()
        self._inflight = 0
        # One lock guards the queue, the in-flight count and the items' started/abandoned
        # flags; the condition wakes engine threads on a new item, a finished run, or closing.
        self._changed = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._runs: set[_Run[P, R]] = set()
        self._hung = 0  # runs cut off by the watchdog that have not returned yet
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._stopping = False

    def use_costs(self, costs: dict[int, float] | None) -> None:
        """Plan batches by what a run of each size costs (seconds, from the engine's warm-up)."""
        if costs:
            self.planner = BatchPlanner(costs, self.max_batch_size)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def hung_runs(self) -> int:
        """Engine runs cut off by the watchdog that are still stuck in the engine."""
        return self._hung

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(self.instances):
            self._add_thread()
        if self.run_timeout_s:
            self._watchdog = self._loop.create_task(self._watch(self.run_timeout_s))

    def _add_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"engine-{len(self._threads)}",
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    async def _watch(self, timeout_s: float) -> None:
        """Cut off runs that take longer than ``timeout_s``: their requests get 504 now, a new
        engine thread takes the stuck one's place, and ``hung_runs`` counts it until it
        returns (readiness turns 503 meanwhile)."""
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            now = self._clock()
            with self._changed:
                late = [r for r in self._runs if not r.abandoned and now - r.started > timeout_s]
                for run in late:
                    run.abandoned = True
                    self._inflight -= 1
                    self._hung += 1
                if late:
                    self._observer.inflight_changed(self._inflight)
            for run in late:
                log.error("engine run of %d image(s) still running after %.1f s: cut off",
                          len(run.batch), timeout_s)
                for item in run.batch:
                    if not item.future.done():
                        item.future.set_exception(DeadlineExceeded(
                            "the engine did not answer in time"))
                self._observer.batch_finished(len(run.batch), now - run.started, False)
                self._add_thread()

    async def submit(self, payload: P, timeout_s: float, hold_while_running: bool = False) -> R:
        """Queue one payload and wait for its result.

        Raises Overloaded when the queue is full, NotReady when draining, DeadlineExceeded when
        ``timeout_s`` passes before its batch starts, EngineFailure when its batch fails.
        Cancelled, it returns at once, unless ``hold_while_running`` and its batch has started:
        then once the run is over, as the payload (a shared-memory slot) is in use until then.
        """
        (item,) = self._enqueue([payload], timeout_s)
        return await self._wait(item, timeout_s, hold_while_running)

    async def submit_many(self, payloads: Sequence[P], timeout_s: float,
                          hold_while_running: bool = False) -> list[R]:
        """Several payloads queued at once, under one lock, so that an engine thread takes them
        together (the tiles of one image: one batch where MAX_BATCH_SIZE allows, else
        consecutive ones). Results in order. The first failure is raised once every other
        payload is out of the queue, or its run over (``hold_while_running``), as ``submit``
        leaves one when cancelled. All or none are queued (Overloaded)."""
        items = self._enqueue(payloads, timeout_s)
        return await all_or_none(self._wait(item, timeout_s, hold_while_running)
                                 for item in items)

    def _enqueue(self, payloads: Sequence[P], timeout_s: float) -> list[_Item[P, R]]:
        if self._closed:
            raise NotReady()
        now = self._clock()
        loop = asyncio.get_running_loop()
        items: list[_Item[P, R]] = [_Item(payload, loop.create_future(), now, now + timeout_s)
                                    for payload in payloads]
        with self._changed:
            if len(self._queue) + len(items) > self.max_queue:
                raise Overloaded(retry_after_s=max(1, round(self.max_delay_s + 1)))
            self._queue.extend(items)
            self._changed.notify()
            # Under the lock: the engine threads report too, and the gauge must end at the
            # last depth, not whichever report came last.
            self._observer.queue_changed(len(self._queue))
        return items

    async def _wait(self, item: _Item[P, R], timeout_s: float, hold_while_running: bool) -> R:
        # One timer rather than asyncio.wait's waiter, callbacks and timer on every item.
        expiry = asyncio.get_running_loop().call_later(timeout_s, self._expire, item)
        try:
            return await (asyncio.shield(item.future) if hold_while_running else item.future)
        except asyncio.CancelledError:  # the client went away (its batch may have started)
            if not self._abandon(item, "cancelled") and hold_while_running:
                # The run ends (the watchdog bounds it), however often this is cancelled
                # meanwhile: its payload is read until then.
                while not item.future.done():
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.shield(item.future)
            raise
        finally:
            expiry.cancel()

    def _expire(self, item: _Item[P, R]) -> None:
        """The item's deadline passed: out of the queue with DeadlineExceeded, unless its batch
        has started (then it waits for the run: the watchdog bounds that)."""
        if not item.future.done() and self._abandon(item, "expired"):
            item.future.set_exception(DeadlineExceeded())

    def _abandon(self, item: _Item[P, R], reason: DropReason) -> bool:
        """Take a waiting item out of the queue; False if its batch has already started."""
        with self._changed:
            if item.started:
                return False
            item.abandoned = True
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
            self._observer.queue_changed(len(self._queue))
        self._observer.dropped(reason)
        return True

    def _take(self) -> list[_Item[P, R]] | None:
        """An engine thread's next batch (None: stop). Policy in the module docstring."""
        with self._changed:
            while not self._queue:
                if self._stopping:
                    return None
                self._changed.wait()
            close_at = self._queue[0].enqueued_at + self.max_delay_s
            while (len(self._queue) < self.max_batch_size and self._inflight > 0
                   and not self._stopping):
                remaining = close_at - self._clock()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            now = self._clock()
            batch: list[_Item[P, R]] = []
            expired: list[_Item[P, R]] = []
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                if item.abandoned:
                    continue
                if now >= item.deadline:
                    item.abandoned = True
                    expired.append(item)
                    continue
                item.started = True
                batch.append(item)
            take = self.planner.take(len(batch) + len(self._queue))
            for item in reversed(batch[take:]):
                item.started = False  # back to the front of the queue, for the next batch
                self._queue.appendleft(item)
                del batch[-1]
            if batch:
                self._inflight += 1
            self._observer.queue_changed(len(self._queue))
            self._observer.inflight_changed(self._inflight)
        for item in expired:
            self._observer.dropped("expired")
            self._deliver(item, error=DeadlineExceeded())
        return batch

    def _work(self) -> None:
        name_os_thread()
        while (batch := self._take()) is not None:
            if batch and not self._run(batch):
                return  # cut off by the watchdog, which started a replacement

    def _run(self, batch: list[_Item[P, R]]) -> bool:
        """Run one batch; False if the watchdog cut it off meanwhile."""
        started = self._clock()
        run: _Run[P, R] = _Run(batch, started)
        with self._changed:
            self._runs.add(run)
        self._observer.batch_started(len(batch), [started - i.enqueued_at for i in batch])
        ok = False
        try:
            results = self._run_batch([i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            ok = True
        except Exception:
            log.exception("engine run failed; failing its %d request(s)", len(batch))
            for item in batch:
                self._deliver(item, error=EngineFailure())
        else:
            for item, result in zip(batch, results):
                self._deliver(item, result=result)
        finally:
            with self._changed:
                self._runs.discard(run)
                if run.abandoned:
                    self._hung -= 1
                else:
                    self._inflight -= 1
                    self._observer.inflight_changed(self._inflight)
                self._changed.notify_all()
            if not run.abandoned:
                self._observer.batch_finished(len(batch), self._clock() - started, ok)
        return not run.abandoned

    def _deliver(self, item: _Item[P, R], result: R | None = None,
                 error: Exception | None = None) -> None:
        """Hand a result to the item's waiter, on the event loop's thread."""

        def settle() -> None:
            if item.future.done():
                return
            if error is not None:
                item.future.set_exception(error)
            else:
                item.future.set_result(result)  # type: ignore[arg-type]

        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            self._loop.call_soon_threadsafe(settle)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new items, then wait until the queued and running ones are done.
        Returns False if ``timeout_s`` passed first."""
        self._closed = True
        deadline = self._clock() + timeout_s
        while self._queue or self._inflight:
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the last run's results, handed over by its thread, land first
        return True

    async def stop(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        with self._changed:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
        for item in left:
            if not item.future.done():
                item.future.set_exception(NotReady())
        for thread in self._threads:  # a running batch finishes first (a hung one: 5 s)
            await asyncio.to_thread(thread.join, 5 if self._hung else 30)
