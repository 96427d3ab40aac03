"""GPU busy time and memory during a measurement, sampled through NVML (``nvidia-ml-py``)
where a GPU is there; elsewhere the sampler reads nothing and the bench reports no GPU figures.
"""

from __future__ import annotations

import threading
from types import ModuleType, TracebackType
from typing import Any


def _nvml() -> ModuleType | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        module: ModuleType = pynvml
        return module
    except Exception:  # no package, no driver or no device: no GPU figures
        return None


class GpuSampler:
    """``with GpuSampler() as gpu: ...`` samples device 0 every ``interval_s``; afterwards
    ``busy_pct`` is the mean share of time a kernel ran (NVML's utilization) and
    ``memory_mb`` the peak of used memory. Both None without a GPU."""

    def __init__(self, device_id: int = 0, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.busy_pct: float | None = None
        self.memory_mb: float | None = None
        self._nvml = _nvml()
        self._handle: Any = (self._nvml.nvmlDeviceGetHandleByIndex(device_id)
                             if self._nvml else None)
        self._busy: list[float] = []
        self._memory: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gpu-sampler", daemon=True)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _read(self) -> None:
        assert self._nvml is not None
        self._busy.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
        self._memory.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 1e6)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if not self.available:
            return
        self._stop.set()
        self._thread.join()
        if not self._busy:
            self._read()
        self.busy_pct = round(sum(self._busy) / len(self._busy), 1)
        self.memory_mb = round(max(self._memory), 1)
