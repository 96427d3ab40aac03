"""Freed memory given back to the system once the service is idle.

glibc's allocator keeps what large requests freed (uploads, decoded photos, parsed bodies) in
its arenas, so the resident size stays at its peak long after (1.1-1.6 GB after a burst of
big /v2 requests). ``malloc_trim`` returns the free pages; it walks the arenas (milliseconds),
so it runs in a worker thread, at most once a second, and only when no request is in flight.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable

MIN_INTERVAL_S = 1.0


def _libc_trim() -> Callable[[], None] | None:
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
        self._trim = trim if trim is not None else _libc_trim()
        self._last = 0.0
        self._running = False
        self.trims = 0

    def idle(self) -> None:
        """The service has just become idle: trim, unless one ran within MIN_INTERVAL_S."""
        if self._trim is None or self._running or time.monotonic() - self._last < MIN_INTERVAL_S:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released outside the event loop (tools): nothing to trim for
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
