"""/metrics as one view of a service that runs as several processes (FRONTENDS > 1).

Every process writes its series to its own files in PROMETHEUS_MULTIPROC_DIR; whichever front
end answers a scrape merges them all: counters and histograms summed, the engine's gauges as
their ``livemax`` mode says. The ``process_*`` metrics are the whole service's: summed over the
supervisor and every process below it, found in /proc, since the bench and the memory tests read
``process_resident_memory_bytes`` as the service's memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

PROC = Path("/proc")

# How a process metric of one process becomes the service's (anything else is summed).
_EARLIEST = "The earliest of the service's processes (the supervisor)."
_LOWEST = "The lowest among the service's processes."
_SUMMED = "Summed over the service's processes (the supervisor and its children)."
_AGGREGATES: dict[str, tuple[Callable[[Iterable[float]], float], str]] = {
    "process_start_time_seconds": (min, _EARLIEST),
    "process_max_fds": (min, _LOWEST),
}


def service_registry(path: str, supervisor_pid: int) -> CollectorRegistry:
    """What /metrics exposes in multiprocess mode: every process's series merged, the service's
    process metrics, and this interpreter's python_info."""
    registry = CollectorRegistry()
    merged = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
    registry.register(LiveSeriesCollector(merged))
    registry.register(ServiceProcessCollector(supervisor_pid))
    PlatformCollector(registry=registry)
    return registry


class LiveSeriesCollector(Collector):
    """The merged files, less the gauge series set to NaN: a process cannot delete a series
    from its file, so the engine marks an unloaded version's gauges and model info so."""

    def __init__(self, merged: Collector) -> None:
        self._merged = merged

    def collect(self) -> Iterable[Metric]:
        for family in self._merged.collect():
            if family.type == "gauge":
                family.samples = [s for s in family.samples if not math.isnan(s.value)]
                if not family.samples:
                    continue
            yield family


def _parent_pid(stat: bytes) -> int:
    # The command name in parentheses may hold spaces and ')': split after the last one.
    return int(stat.rsplit(b")", 1)[1].split()[1])


def _children_by_parent(proc: Path) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = _parent_pid((entry / "stat").read_bytes())
        except (OSError, IndexError, ValueError):  # it exited while we looked
            continue
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(root: int, proc: Path = PROC) -> list[int]:
    """``root`` (when alive) and every process below it."""
    children = _children_by_parent(proc)
    found: list[int] = [root] if (proc / str(root)).exists() else []
    pending = [root]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return found


def service_pids(root: int, proc: Path = PROC) -> list[int]:
    """``descendants(root)``, and always this process (so that a front end whose supervisor
    is gone still counts itself)."""
    found = descendants(root, proc)
    if os.getpid() not in found:
        found.append(os.getpid())
    return found


class ServiceProcessCollector(Collector):
    """prometheus_client's process metrics, one set for the whole service."""

    def __init__(self, supervisor_pid: int, proc: Path = PROC) -> None:
        self._root, self._proc = supervisor_pid, proc
        self._per_pid: dict[int, ProcessCollector] = {}

    def _collector(self, pid: int) -> ProcessCollector:
        collector = self._per_pid.get(pid)
        if collector is None:
            collector = ProcessCollector(pid=lambda: pid, proc=str(self._proc), registry=None)
        return collector

    def collect(self) -> Iterable[Metric]:
        # A fresh dict each time: a process gone is forgotten, and a concurrent scrape never
        # sees this one half-built.
        collectors = {pid: self._collector(pid) for pid in service_pids(self._root, self._proc)}
        self._per_pid = collectors
        values: dict[str, list[float]] = {}
        families: dict[str, Metric] = {}
        for collector in collectors.values():
            for family in collector.collect():  # what a process that exited meanwhile still had
                families.setdefault(family.name, family)
                values.setdefault(family.name, []).extend(s.value for s in family.samples)
        return [_service_family(family, values[name]) for name, family in families.items()]


def _service_family(one_process: Metric, values: list[float]) -> Metric:
    aggregate, how = _AGGREGATES.get(one_process.name, (sum, _SUMMED))
    documentation = f"{one_process.documentation} {how}"
    if one_process.type == "counter":
        return CounterMetricFamily(one_process.name, documentation, value=aggregate(values))
    return GaugeMetricFamily(one_process.name, documentation, value=aggregate(values))
