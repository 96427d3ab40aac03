"""Memory readings for the engine's report: what each bucket's session costs.

On a GPU, the device's used memory through NVML (the ``nvidia-ml-py`` package, present wherever
an NVIDIA driver is; without it, no reading); on a CPU, this process's resident memory.
"""

from __future__ import annotations

import os
from typing import Literal

MemoryKind = Literal["gpu", "host"]


def gpu_memory_used_bytes(device_id: int = 0) -> int | None:
    """Memory in use on the device (by every process), or None where NVML is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no package, no driver, no device: no reading
        return None


def host_memory_used_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_used_bytes(kind: MemoryKind, device_id: int = 0) -> int | None:
    return gpu_memory_used_bytes(device_id) if kind == "gpu" else host_memory_used_bytes()
