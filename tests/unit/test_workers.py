"""app.workers.WorkerPool with real threads: results and errors reach the caller; a job
cancelled while queued never runs; a running job's caller waits for its end however often
it is cancelled; shutdown cancels what has not started."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.workers import WorkerPool


def test_results_and_errors_reach_the_caller_from_a_named_thread() -> None:
    pool = WorkerPool(2, "unit")

    def where(x: int) -> tuple[int, str]:
        return x * 2, threading.current_thread().name

    def fails() -> None:
        raise ValueError("broken")

    async def main() -> None:
        results = await asyncio.gather(*(pool.run(where, k) for k in range(20)))
        assert [r[0] for r in results] == [k * 2 for k in range(20)]
        assert {r[1] for r in results} <= {"unit_0", "unit_1"}
        with pytest.raises(ValueError, match="broken"):
            await pool.run(fails)

    asyncio.run(main())
    pool.shutdown()


def test_a_job_cancelled_while_queued_never_runs() -> None:
    pool = WorkerPool(1, "unit")
    release = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        blocker = asyncio.ensure_future(pool.run(release.wait, 30))
        queued = asyncio.ensure_future(pool.run(ran.append, "queued"))
        await asyncio.sleep(0)  # both submitted
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await blocker is True
        await pool.run(ran.append, "after")  # the one thread took the next job: none between

    asyncio.run(main())
    pool.shutdown()
    assert ran == ["after"]


def test_a_running_job_is_waited_for_however_often_its_caller_is_cancelled() -> None:
    pool = WorkerPool(1, "unit")
    started, release = threading.Event(), threading.Event()
    ended: list[bool] = []

    def job() -> None:
        started.set()
        release.wait(30)
        ended.append(True)

    async def main() -> None:
        caller = asyncio.ensure_future(pool.run(job))
        while not started.is_set():
            await asyncio.sleep(0.001)
        for _ in range(3):
            caller.cancel()
            await asyncio.sleep(0.01)
            assert not caller.done()  # still waiting for the job's end
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert ended == [True]  # it returned only once the job had ended

    asyncio.run(main())
    pool.shutdown()


def test_shutdown_cancels_what_has_not_started_and_refuses_new_jobs() -> None:
    pool = WorkerPool(1, "unit")
    release = threading.Event()

    async def main() -> None:
        running = asyncio.ensure_future(pool.run(release.wait, 30))
        waiting = asyncio.ensure_future(pool.run(lambda: "never"))
        await asyncio.sleep(0.05)
        pool.shutdown()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        assert await running is True
        with pytest.raises(RuntimeError):
            await pool.run(lambda: None)

    asyncio.run(main())


def test_a_pool_starts_its_threads_on_the_first_job_only() -> None:
    before = {t.name for t in threading.enumerate()}
    pool = WorkerPool(3, "lazy")
    assert not {t.name for t in threading.enumerate()} - before  # a failed load starts none

    async def main() -> None:
        assert await pool.run(lambda: 5) == 5

    asyncio.run(main())
    assert {"lazy_0", "lazy_1", "lazy_2"} <= {t.name for t in threading.enumerate()}
    pool.shutdown()


def test_a_skipped_job_is_not_held_by_its_worker() -> None:
    import gc
    import weakref

    class Upload:
        pass

    pool = WorkerPool(1, "unit")
    release = threading.Event()
    upload = Upload()
    held = weakref.ref(upload)

    async def main(payload: Upload) -> None:
        blocker = asyncio.ensure_future(pool.run(release.wait, 30))
        queued = asyncio.ensure_future(pool.run(id, payload))
        await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await blocker  # the worker goes on to the skipped job, then waits for the next

    asyncio.run(main(upload))
    del upload
    deadline = time.monotonic() + 10
    while held() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert held() is None
    pool.shutdown()
