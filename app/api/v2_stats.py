"""Triton's model statistics (the extension ``statistics``) read from the Prometheus collectors
that /metrics exposes, so that the two always agree and, with FRONTENDS > 1, every process is
counted (that registry merges them all). Times in ns, as Triton gives them; /metrics has
seconds.

How each field is read (per model version; ``_count``/``_sum`` of a histogram or summary):

- ``success``, ``fail``: inference requests (/detect, /detect/batch, /detect/render, the
  protocol's infer over REST and gRPC) answered 200 or not, and their time from request to
  response: ``dfine_inference_requests_seconds{outcome}``.
- ``queue``: each image's wait for its engine run, ``dfine_queue_wait_seconds`` (counted per
  image: a request's images wait in the queue each on its own).
- ``compute_input``: decode and preprocessing, per image, ``dfine_preprocess_seconds``.
- ``compute_infer``: engine runs (a whole batch each), ``dfine_inference_seconds``.
- ``compute_output``: detections from an image's rows, per image, ``dfine_postprocess_seconds``.
- ``cache_hit``, ``cache_miss``: zero (no response cache).
- ``inference_count``: images run, ``dfine_images_total``; ``execution_count``: engine runs,
  ``dfine_batch_size_count`` (so their ratio is the average batch size, as Triton reports it).
- ``last_inference``: ``dfine_last_inference_timestamp_seconds`` in ms (0: none yet).
- ``batch_stats``: successful runs of each batch size and their time,
  ``dfine_batch_runs_seconds{batch_size}``, as ``compute_infer``; their ``compute_input`` and
  ``compute_output`` carry the count with 0 ns (input and output are prepared per image,
  outside the batch's run).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry

# sample name -> [(labels, value)]
Samples = dict[str, list[tuple[dict[str, str], float]]]

NS_PER_S = 1_000_000_000
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
             "cache_hit", "cache_miss")
# A duration's collector (histogram or summary) and the labels that select it beyond the
# version's; None: always zero.
_SOURCES: dict[str, tuple[str, dict[str, str]] | None] = {
    "success": ("dfine_inference_requests_seconds", {"outcome": "success"}),
    "fail": ("dfine_inference_requests_seconds", {"outcome": "fail"}),
    "queue": ("dfine_queue_wait_seconds", {}),
    "compute_input": ("dfine_preprocess_seconds", {}),
    "compute_infer": ("dfine_inference_seconds", {}),
    "compute_output": ("dfine_postprocess_seconds", {}),
    "cache_hit": None,
    "cache_miss": None,
}
BATCH_RUNS = "dfine_batch_runs_seconds"
LAST_INFERENCE = "dfine_last_inference_timestamp_seconds"


def read_samples(registry: CollectorRegistry) -> Samples:
    """Every sample of the ``dfine_`` families, by sample name. In multiprocess mode this reads
    every process's files: call it off the event loop."""
    found: Samples = defaultdict(list)
    for family in registry.collect():
        if family.name.startswith("dfine_"):
            for sample in family.samples:
                found[sample.name].append((sample.labels, sample.value))
    return found


class _Version:
    """One version's samples."""

    def __init__(self, samples: Samples, name: str, version: int) -> None:
        self.samples, self.labels = samples, {"model": name, "version": str(version)}

    def total(self, sample: str, **labels: str) -> float:
        wanted = {**self.labels, **labels}.items()
        return sum(value for have, value in self.samples.get(sample, ())
                   if wanted <= have.items() and value == value)  # NaN: a dropped series

    def duration(self, metric: str, **labels: str) -> dict[str, int]:
        return {"count": round(self.total(f"{metric}_count", **labels)),
                "ns": round(self.total(f"{metric}_sum", **labels) * NS_PER_S)}

    def batch_stats(self) -> list[dict[str, Any]]:
        sizes: set[int] = set()
        for have, _ in self.samples.get(f"{BATCH_RUNS}_count", ()):
            if self.labels.items() <= have.items() and have.get("batch_size", "").isdigit():
                sizes.add(int(have["batch_size"]))
        stats = []
        for size in sorted(sizes):
            infer = self.duration(BATCH_RUNS, batch_size=str(size))
            if infer["count"]:
                untimed = {"count": infer["count"], "ns": 0}
                stats.append({"batch_size": size, "compute_input": untimed,
                              "compute_infer": infer, "compute_output": dict(untimed)})
        return stats


def version_statistics(samples: Samples, name: str, version: int) -> dict[str, Any]:
    """One version's ModelStatistics, as Triton's JSON (every counter a number, the version a
    string, every duration present)."""
    one = _Version(samples, name, version)
    durations = {}
    for field in DURATIONS:
        source = _SOURCES[field]
        durations[field] = ({"count": 0, "ns": 0} if source is None
                            else one.duration(source[0], **source[1]))
    return {
        "name": name, "version": str(version),
        "last_inference": round(one.total(LAST_INFERENCE) * 1000),
        "inference_count": round(one.total("dfine_images_total")),
        "execution_count": round(one.total("dfine_batch_size_count")),
        "inference_stats": durations,
        "response_stats": {},
        "batch_stats": one.batch_stats(),
        "memory_usage": [],
    }


def statistics(samples: Samples, versions: list[tuple[str, int]]) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for these (name, version), in order."""
    return {"model_stats": [version_statistics(samples, n, v) for n, v in versions]}
