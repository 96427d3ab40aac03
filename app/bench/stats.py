"""Results of a load run: samples in, throughput and latency percentiles out."""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.metrics_view import descendants


@dataclass
class Sample:
    status: int  # HTTP status; 0 for a transport error
    latency_s: float
    server_s: float | None = None  # the service's own time for it, when read from the answer


@dataclass
class RunResult:
    target: str  # service, peer or ceiling
    mode: str  # closed or open
    load: float  # concurrency, or requests per second offered
    duration_s: float
    requests: int
    ok: int
    throughput_rps: float  # successful requests per second
    images_per_s: float
    latency_ms: dict[str, float]  # of successful requests: p50, p90, p99, max
    errors: dict[str, int]  # by status
    error_latency_ms_p99: float | None = None  # how fast refusals came back
    avg_batch_size: float | None = None
    rss_mb: float | None = None
    cpu_ms_per_request: float | None = None  # the server's CPU (all threads) per success
    # latency minus the service's own time (HTTP, the client): p50 and p99, when read
    http_ms: dict[str, float] | None = None
    gpu_busy_pct: float | None = None  # mean share of time a GPU kernel ran (NVML)
    gpu_memory_mb: float | None = None  # peak GPU memory in use
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(target: str, mode: str, load: float, samples: list[Sample], duration_s: float,
              images_per_request: int = 1, cpu_s: float | None = None) -> RunResult:
    """``cpu_s``: the server's CPU seconds over the run, when known."""
    ok = [s.latency_s for s in samples if s.status == 200]
    failed = [s for s in samples if s.status != 200]
    latencies = np.asarray(ok) * 1000 if ok else np.asarray([np.nan])
    percentiles = {f"p{q}": round(float(np.percentile(latencies, q)), 2) for q in (50, 90, 99)}
    percentiles["max"] = round(float(np.max(latencies)), 2)
    error_p99 = (round(float(np.percentile([s.latency_s * 1000 for s in failed], 99)), 2)
                 if failed else None)
    added = [(s.latency_s - s.server_s) * 1000 for s in samples
             if s.status == 200 and s.server_s is not None]
    http_ms = ({f"p{q}": round(float(np.percentile(added, q)), 2) for q in (50, 99)}
               if added else None)
    return RunResult(
        target=target, mode=mode, load=load, duration_s=round(duration_s, 3), http_ms=http_ms,
        requests=len(samples), ok=len(ok),
        throughput_rps=round(len(ok) / duration_s, 2),
        images_per_s=round(len(ok) * images_per_request / duration_s, 2),
        latency_ms=percentiles,
        errors={str(k): v for k, v in sorted(Counter(s.status for s in failed).items())},
        error_latency_ms_p99=error_p99,
        cpu_ms_per_request=round(cpu_s / len(ok) * 1000, 2) if cpu_s is not None and ok else None,
    )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of every process under it (with FRONTENDS
    > 1 the service is a supervisor and its children), all their threads (Linux /proc)."""
    def ticks(process: int) -> int:
        fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    total = ticks(pid)  # raises when the process has gone
    for process in descendants(pid)[1:]:
        with contextlib.suppress(OSError):  # gone meanwhile
            total += ticks(process)
    return total / os.sysconf("SC_CLK_TCK")


def _labels(text: str) -> set[str]:
    return {pair.strip() for pair in re.findall(r'[A-Za-z_][A-Za-z0-9_]*="(?:[^"\\]|\\.)*"',
                                                text)}


def metric_value(exposition: str, selector: str) -> float:
    """The sum of the samples a selector matches in a Prometheus exposition text, as PromQL
    would: ``name`` or ``name{label="value",...}``, any other labels allowed."""
    name, _, wanted = selector.partition("{")
    want = _labels(wanted)
    total = 0.0
    for line in exposition.splitlines():
        if not line.startswith((name + " ", name + "{")):
            continue
        series, value = line.rsplit(" ", 1)
        if want <= _labels(series[len(name):]):
            total += float(value)
    return total
