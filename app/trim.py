"""Freed memory given back to the system once the service is idle.

glibc's allocator keeps what large requests freed (uploads, decoded photos, parsed bodies) in
its arenas, so the resident size stays at its peak long after (+88 MB after 12 /v2 requests of
16 large photos here). ``malloc_trim`` returns the free pages; it walks the arenas
(milliseconds), so it runs in a worker thread, at most once a second: when the service turns
idle within a second of the last trim, one more runs when that second is over. Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable

MIN_INTERVAL_S = 1.0
# glibc serves a request of at least this many bytes with its own mapping, given back when
# freed. Its default threshold moves up (to 32 MiB) each time a large block is freed, so that
# after a model is unloaded the next one's buffers land in the arenas, interleaved with small
# blocks that pin them: RSS after five load-unload cycles wandered 188 to 223 MB here, 184 to
# 189 MB with a fixed 4 MiB. Blocks under it (a model-size tensor, a decoded camera frame) are
# still reused from the arenas.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
# Freed memory at the top of the heap is given back when it passes this. glibc's 128 KiB (fixed
# once the mmap threshold is set) gave back what each request's decode had used, and the next
# request faulted the pages in again: ~180 page faults a request, and a photo's decode cost
# 1.5 ms more. Under load it now stays for the next requests; once idle, or after a model is
# unloaded, malloc_trim gives it back, which it does for the main arena whatever the threshold.
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
# One arena: malloc_trim does not shrink the heaps of the threads' own arenas, whose tops would
# keep up to the threshold each (an unloaded model's 32 MB stayed). Only large blocks come
# from glibc (Python's small objects have their own allocator): a few a request, so threads
# rarely wait on its lock.
ARENAS = 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters (malloc.h)


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap and trim thresholds and its arenas (the process's allocator, once at
    start, before threads); False elsewhere than glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
                and mallopt(M_ARENA_MAX, ARENAS))


def libc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class IdleTrimmer:
    def __init__(self, trim: Callable[[], None] | None = None) -> None:
        self._trim = trim if trim is not None else libc_trim()
        self._last = float("-inf")
        self._pending: asyncio.TimerHandle | None = None
        self._running = False
        self.trims = 0

    def idle(self) -> None:
        """The service has just become idle: trim now, or once MIN_INTERVAL_S has passed since
        the last one (a single trim is ever pending)."""
        if self._trim is None or self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released outside the event loop (tools): nothing to trim for
            return
        delay = max(0.0, self._last + MIN_INTERVAL_S - time.monotonic())
        self._pending = loop.call_later(delay, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = None
        if self._running:  # the last one is still walking the arenas
            return
        self._running = True
        self._last = time.monotonic()
        loop.run_in_executor(None, self._run)

    def _run(self) -> None:
        try:
            assert self._trim is not None
            self._trim()
            self.trims += 1
        finally:
            self._running = False
