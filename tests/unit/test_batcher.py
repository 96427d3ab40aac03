"""The batcher with a stub engine: a plain function that records the batches it is given."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.batching import DynamicBatcher
from app.errors import DeadlineExceeded, EngineFailure, NotReady, Overloaded
from tests.helpers import wait_until_async


class StubEngine:
    """Doubles each payload after ``delay_s``; fails batches containing ``fail_on``."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None,
                 hang_on: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.hang_on = hang_on
        self.unhang = threading.Event()
        self.batches: list[list[int]] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, payloads: list[int]) -> list[int]:
        with self._lock:
            self.batches.append(list(payloads))
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            self.release.wait(5)
            if self.hang_on is not None and self.hang_on in payloads:
                self.unhang.wait(10)
            time.sleep(self.delay_s)
            if self.fail_on is not None and self.fail_on in payloads:
                raise RuntimeError("injected engine failure")
            return [p * 2 for p in payloads]
        finally:
            with self._lock:
                self.concurrent -= 1


def make(engine: StubEngine, **kwargs: float) -> DynamicBatcher[int, int]:
    options = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue": 64, "instances": 1}
    options.update(kwargs)
    batcher: DynamicBatcher[int, int] = DynamicBatcher(engine, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def occupy(batcher: DynamicBatcher[int, int], engine: StubEngine) -> asyncio.Future[int]:
    """Submit payload 0 and wait until its run has started (and blocks, if the engine holds)."""
    running = asyncio.ensure_future(batcher.submit(0, timeout_s=5))
    await wait_until_async(lambda: engine.batches, 10, "the first run started")
    return running


async def queued(batcher: DynamicBatcher[int, int], depth: int) -> None:
    await wait_until_async(lambda: batcher.queue_depth == depth, 10, f"{depth} in the queue")


async def test_lone_request_on_idle_engine_does_not_wait_for_the_delay() -> None:
    engine = StubEngine()
    batcher = make(engine, max_delay_s=2.0)
    started = time.perf_counter()
    assert await batcher.submit(21, timeout_s=5) == 42
    assert time.perf_counter() - started < 1.0  # not MAX_DELAY's 2 s
    await batcher.stop()


async def test_batches_close_at_max_batch_size_and_keep_order() -> None:
    engine = StubEngine(delay_s=0.05)
    batcher = make(engine, max_batch_size=4, max_delay_s=1.0)
    results = await asyncio.gather(*(batcher.submit(i, timeout_s=5) for i in range(9)))
    assert results == [i * 2 for i in range(9)]
    assert all(len(b) <= 4 for b in engine.batches)
    assert [p for b in engine.batches for p in b] == list(range(9))  # first come, first run
    assert max(len(b) for b in engine.batches) == 4
    await batcher.stop()


async def test_batch_closes_after_max_delay_while_engine_is_busy() -> None:
    engine = StubEngine()
    engine.release.clear()  # the first run blocks, so the engine is busy
    batcher = make(engine, max_batch_size=8, max_delay_s=0.1, instances=2)
    first = await occupy(batcher, engine)
    started = time.perf_counter()
    second = asyncio.ensure_future(batcher.submit(1, timeout_s=5))
    third = asyncio.ensure_future(batcher.submit(2, timeout_s=5))
    await wait_until_async(lambda: len(engine.batches) >= 2, 10, "the second batch")
    waited = time.perf_counter() - started
    engine.release.set()
    assert await asyncio.gather(first, second, third) == [0, 2, 4]
    assert engine.batches == [[0], [1, 2]]  # 1 and 2 waited together for the delay
    # Closed at the delay (0.1 s), not before, nor when the busy run ended (never, here).
    assert 0.07 < waited < 1.5
    await batcher.stop()


async def test_queue_full_is_refused_with_overloaded() -> None:
    engine = StubEngine()
    engine.release.clear()
    batcher = make(engine, max_batch_size=1, max_queue=2)
    running = await occupy(batcher, engine)
    waiting = [asyncio.ensure_future(batcher.submit(i, timeout_s=5)) for i in (1, 2)]
    await queued(batcher, 2)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(3, timeout_s=5)
    assert refused.value.retry_after_s >= 1
    engine.release.set()
    assert await asyncio.gather(running, *waiting) == [0, 2, 4]
    await batcher.stop()


async def test_request_past_its_deadline_before_its_batch_gets_timeout() -> None:
    engine = StubEngine()
    engine.release.clear()
    batcher = make(engine, max_batch_size=1)
    running = await occupy(batcher, engine)
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(1, timeout_s=0.1)
    # Answered at its deadline, not after the run (which holds until released, up to 5 s).
    assert time.perf_counter() - started < 2.0
    assert batcher.queue_depth == 0
    engine.release.set()
    assert await running == 0
    assert await batcher.submit(2, timeout_s=5) == 4  # runs after anything left queued
    assert engine.batches == [[0], [2]]  # the expired request never ran
    await batcher.stop()


async def test_running_request_is_not_timed_out_mid_run() -> None:
    engine = StubEngine()
    engine.release.clear()
    batcher = make(engine)
    pending = asyncio.ensure_future(batcher.submit(5, timeout_s=1.0))
    await wait_until_async(lambda: engine.batches, 10, "its run started")
    await asyncio.sleep(1.2)  # its deadline passes while it runs
    engine.release.set()
    assert await pending == 10  # started in time, so it completes
    await batcher.stop()


async def test_cancelled_request_is_dropped_before_it_runs() -> None:
    engine = StubEngine()
    engine.release.clear()
    batcher = make(engine, max_batch_size=1)
    running = await occupy(batcher, engine)
    gone = asyncio.ensure_future(batcher.submit(1, timeout_s=5))
    await queued(batcher, 1)
    gone.cancel()
    await queued(batcher, 0)
    engine.release.set()
    await running
    assert await batcher.submit(2, timeout_s=5) == 4
    assert engine.batches == [[0], [2]]
    await batcher.stop()


@pytest.mark.parametrize("hold", [False, True])
async def test_a_cancelled_request_whose_run_started_ends_after_it_only_if_held(
        hold: bool) -> None:
    """The engine process answers a run whose client left only once its batch no longer reads
    the image's shared-memory slot (``hold_while_running``); a request in one process ends at
    once."""
    engine = StubEngine()
    engine.release.clear()
    batcher = make(engine, max_batch_size=1)
    events: list[str] = []

    async def submit() -> None:
        try:
            await batcher.submit(0, timeout_s=5, hold_while_running=hold)
        except asyncio.CancelledError:
            events.append("cancel returned")
            raise

    task = asyncio.ensure_future(submit())
    await wait_until_async(lambda: engine.batches, 10, "the run started")
    task.cancel()
    for _ in range(10):  # loop turns, not time: a cancel takes one or two
        await asyncio.sleep(0)
    assert events == ([] if hold else ["cancel returned"])
    engine.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["cancel returned"]
    await wait_until_async(lambda: engine.concurrent == 0, 10, "the run over")
    await batcher.stop()


async def test_engine_failure_fails_only_its_batch() -> None:
    engine = StubEngine(delay_s=0.02, fail_on=3)
    batcher = make(engine, max_batch_size=2, max_delay_s=0.0)
    results = await asyncio.gather(*(batcher.submit(i, timeout_s=5) for i in range(6)),
                                   return_exceptions=True)
    failed = {i for i, r in enumerate(results) if isinstance(r, EngineFailure)}
    batch_with_3 = next(b for b in engine.batches if 3 in b)
    assert failed == set(batch_with_3)
    assert all(results[i] == i * 2 for i in range(6) if i not in failed)
    assert await batcher.submit(10, timeout_s=5) == 20  # the batcher carries on
    await batcher.stop()


async def test_instances_bound_the_runs_in_flight() -> None:
    engine = StubEngine(delay_s=0.05)
    batcher = make(engine, max_batch_size=1, instances=2)
    await asyncio.gather(*(batcher.submit(i, timeout_s=5) for i in range(8)))
    assert engine.max_concurrent == 2
    await batcher.stop()


async def test_drain_finishes_queued_work_and_refuses_new() -> None:
    engine = StubEngine(delay_s=0.05)
    batcher = make(engine, max_batch_size=2)
    pending = [asyncio.ensure_future(batcher.submit(i, timeout_s=5)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert await batcher.drain(timeout_s=5)
    assert [p.result() for p in pending] == [0, 2, 4, 6, 8]
    with pytest.raises(NotReady):
        await batcher.submit(1, timeout_s=5)
    await batcher.stop()


async def test_watchdog_cuts_off_a_hung_run_and_the_batcher_carries_on() -> None:
    engine = StubEngine(hang_on=7)
    batcher = make(engine, max_batch_size=1, run_timeout_s=0.2)
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(7, timeout_s=5)
    assert time.perf_counter() - started < 3.0  # cut off, not waited for (it hangs 10 s)
    assert batcher.hung_runs == 1
    assert await batcher.submit(3, timeout_s=5) == 6  # a replacement engine thread serves
    engine.unhang.set()
    await wait_until_async(lambda: batcher.hung_runs == 0, 10, "the hung run to return")
    assert batcher.inflight == 0
    assert await batcher.submit(4, timeout_s=5) == 8
    await batcher.stop()


async def test_payloads_submitted_together_run_together_on_an_idle_engine() -> None:
    """submit_many (an image's tiles) queues them under one lock: the engine thread that wakes
    takes them all, where separate submits on an idle engine may start a run with the first."""
    engine = StubEngine()
    batcher = make(engine, max_batch_size=8, max_delay_s=0.0, instances=1)
    for round_ in range(20):
        payloads = list(range(round_ * 10, round_ * 10 + 6))
        assert await batcher.submit_many(payloads, timeout_s=5) == [p * 2 for p in payloads]
        assert engine.batches[-1] == payloads
    assert await batcher.submit_many(list(range(11)), timeout_s=5) == [
        p * 2 for p in range(11)]
    assert [len(b) for b in engine.batches[-2:]] == [8, 3]
    await batcher.stop()


async def test_submit_many_is_all_or_none_and_a_failure_leaves_nothing_queued() -> None:
    engine = StubEngine()
    engine.release.clear()
    batcher = make(engine, max_batch_size=1, max_queue=3)
    running = await occupy(batcher, engine)
    with pytest.raises(Overloaded):
        await batcher.submit_many([1, 2, 3, 4], timeout_s=5)
    assert batcher.queue_depth == 0  # none of them was queued
    group = asyncio.ensure_future(batcher.submit_many([5, 6, 7], timeout_s=5))
    await queued(batcher, 3)
    group.cancel()  # the request has gone: every one of its payloads leaves the queue
    with pytest.raises(asyncio.CancelledError):
        await group
    assert batcher.queue_depth == 0
    engine.release.set()
    assert await running == 0
    engine.fail_on = 9
    with pytest.raises(EngineFailure):
        await batcher.submit_many([8, 9], timeout_s=5)
    await batcher.stop()
