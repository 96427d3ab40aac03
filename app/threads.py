"""OS names for the service's threads, so that ``top -H``, ``/proc/<pid>/task/*/comm`` and
``dfine-serve bench --wrk``'s per-thread CPU tell the event loop, decode workers and engine
threads apart (Python 3.11 names its threads for Python only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

PR_SET_NAME = 15  # prctl's option (linux/prctl.h); the kernel keeps 15 bytes
_libc_name = ctypes.util.find_library("c")
_prctl = getattr(ctypes.CDLL(_libc_name), "prctl", None) if _libc_name else None


def name_os_thread() -> None:
    """Give the calling thread its Python name at the OS level (Linux; elsewhere nothing).
    Suits ``ThreadPoolExecutor(initializer=...)`` and the first line of a thread's target."""
    if _prctl is not None:
        _prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)
