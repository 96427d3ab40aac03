"""A pool of threads that run blocking work for the event loop (a version's decode workers).

Unlike ``loop.run_in_executor`` on a ThreadPoolExecutor, a job's result goes straight to the
asyncio future its caller awaits: no concurrent.futures Future, no callbacks chaining the two,
no condition variables. That was a tenth of the event loop's work on a small image.

The semantics ``Detector`` needs (app.service): a job cancelled before it starts never runs;
once it runs, its caller waits for its end however often it is cancelled meanwhile (the job may
be writing into memory the caller gives back when it returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Generic, TypeVar

from app.threads import name_os_thread

T = TypeVar("T")

_QUEUED, _RUNNING, _CANCELLED, _ENDED = range(4)


class _Job(Generic[T]):
    __slots__ = ("args", "ended", "future", "state", "work")

    def __init__(self, work: Callable[..., T], args: tuple[Any, ...],
                 future: asyncio.Future[T]) -> None:
        self.work, self.args, self.future = work, args, future
        self.state = _QUEUED
        self.ended: asyncio.Future[None] | None = None  # awaited by a cancelled caller


class WorkerPool:
    """``threads`` threads named ``name``_k, started on the first job (a version that fails to
    load, or the engine process's copy of one with FRONTENDS > 1, starts none). At interpreter
    exit, as ThreadPoolExecutor's, they finish their job and are joined: a thread killed inside
    OpenCV's code aborts the process."""

    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # a job's QUEUED -> RUNNING or CANCELLED: one of the two
        self._closed = False
        self._size, self._name = threads, name
        self._threads: list[threading.Thread] = []

    def _start(self) -> None:
        with self._lock:
            if self._threads or self._closed:
                return
            self._threads = [threading.Thread(target=self._serve, name=f"{self._name}_{k}")
                             for k in range(self._size)]
        threading._register_atexit(  # type: ignore[attr-defined]
            partial(_shut_down_if_alive, weakref.ref(self)))
        for thread in self._threads:
            thread.start()

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in a thread of the pool; its result or exception."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        if not self._threads:
            self._start()
        job: _Job[T] = _Job(work, args, asyncio.get_running_loop().create_future())
        self._jobs.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            if self._leave_queue(job, _CANCELLED) or job.state == _CANCELLED:  # it never starts
                raise
            # Running: wait for its end, however often cancelled meanwhile.
            while job.state != _ENDED:
                if job.ended is None:
                    job.ended = job.future.get_loop().create_future()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(job.ended)
            raise

    def shutdown(self) -> None:
        """No new jobs; those not started are cancelled; the threads end after their job."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and self._leave_queue(job, _CANCELLED):
                with contextlib.suppress(RuntimeError):  # its loop has closed
                    job.future.get_loop().call_soon_threadsafe(job.future.cancel)
        for _ in self._threads:
            self._jobs.put(None)

    def _leave_queue(self, job: _Job[Any], state: int) -> bool:
        """QUEUED -> ``state`` (RUNNING or CANCELLED), for one side only; False if the other
        side has already taken the job out of the queue."""
        with self._lock:
            if job.state != _QUEUED:
                return False
            job.state = state
            return True

    def _serve(self) -> None:
        name_os_thread()
        while (job := self._jobs.get()) is not None:
            if self._leave_queue(job, _RUNNING):  # else cancelled while queued
                try:
                    result, error = job.work(*job.args), None
                except BaseException as exc:
                    result, error = None, exc
                with contextlib.suppress(RuntimeError):  # its loop has closed: nobody awaits
                    job.future.get_loop().call_soon_threadsafe(_deliver, job, result, error)
                del result, error
            del job  # its upload and slot are not held while this thread waits for the next


def _shut_down_if_alive(pool: weakref.ref[WorkerPool]) -> None:
    if (alive := pool()) is not None:
        alive.shutdown()


def _deliver(job: _Job[Any], result: Any, error: BaseException | None) -> None:
    """On the job's event loop: its result to its caller (unless the caller has gone)."""
    job.state = _ENDED
    if not job.future.done():
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)
    if job.ended is not None and not job.ended.done():
        job.ended.set_result(None)
