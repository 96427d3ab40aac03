"""The bench's GPU figures without a GPU: the engine ceiling by bucket on CPU sessions, the
NVML sampler on a fake NVML module (no GPU here: the fake stands in for the driver), and the
plot's GPU panel."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import pytest

from app.bench.ceiling import engine_ceiling
from app.bench.gpu import GpuSampler
from app.bench.images import synthetic_jpegs
from app.bench.plot import write_plot
from app.bench.stats import RunResult
from app.config import Settings
from tests.helpers import DEFAULT_MODEL


def test_engine_ceiling_measures_every_bucket_and_names_the_best() -> None:
    settings = Settings(model_path=DEFAULT_MODEL, providers="cpu", batch_buckets="1,2",
                        max_batch_size=2, instances=1)
    ceiling = engine_ceiling(settings, synthetic_jpegs(2, 640, 480), duration_s=1.0)
    assert set(ceiling.images_per_s) == {1, 2} and min(ceiling.images_per_s.values()) > 0
    assert ceiling.best == max(ceiling.images_per_s.values())
    assert ceiling.as_dict()["best_batch"] == ceiling.best_batch


class FakeNvml:
    """Reports 40 % busy, then 80 %, and 1,000 MB of memory, then 3,000."""

    def __init__(self) -> None:
        self.reads = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        self.reads += 1
        return SimpleNamespace(gpu=40 if self.reads == 1 else 80)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return SimpleNamespace(used=1e9 if self.reads == 1 else 3e9)


def test_gpu_sampler_averages_busy_time_and_keeps_peak_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    with GpuSampler(interval_s=0.01) as gpu:
        while gpu._nvml.reads < 4:  # type: ignore[union-attr]
            time.sleep(0.01)
    reads = gpu._nvml.reads  # type: ignore[union-attr]
    assert gpu.busy_pct == pytest.approx((40 + 80 * (reads - 1)) / reads, abs=0.1)
    assert gpu.memory_mb == 3000


def test_without_nvml_the_sampler_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as without the package
    with GpuSampler() as gpu:
        pass
    assert not gpu.available and gpu.busy_pct is None and gpu.memory_mb is None


def result(target: str, load: float, busy: float | None) -> RunResult:
    return RunResult(target, "closed", load, 1.0, 10, 10, 10.0, 10.0,
                     {"p50": 5.0, "p90": 6.0, "p99": 7.0, "max": 8.0}, {}, gpu_busy_pct=busy)


def test_plot_gets_a_gpu_panel_only_when_gpu_figures_exist(tmp_path: Path) -> None:
    cpu = write_plot([result("service", 1, None), result("service", 8, None),
                      result("peer", 1, None), result("peer", 8, None)], tmp_path / "cpu.png")
    gpu = write_plot([result("service", 1, 30.0), result("service", 8, 90.0)],
                     tmp_path / "gpu.png")
    assert cpu is not None and gpu is not None  # matplotlib comes with `make test`
    cpu_width, gpu_width = cv2.imread(str(cpu)).shape[1], cv2.imread(str(gpu)).shape[1]
    # Three panels (throughput, p50, p99), four with GPU busy: a quarter wider.
    assert gpu_width / cpu_width == pytest.approx(4 / 3, rel=0.02)


def test_without_matplotlib_the_bench_writes_no_plot(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):  # the extra not installed (a fault, injected)
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_plot([result("service", 1, None)], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
