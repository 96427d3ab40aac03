"""Prometheus metrics (base units, ``_total`` counters, ``_seconds`` histograms).

Each app owns its registry, so several apps (tests) never share counters.
Average batch size = dfine_images_total / dfine_batch_size_count, as Triton reports it.
"""

from __future__ import annotations

import contextlib
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from app.batching import DropReason

# From well under a millisecond (a cached TensorRT run) to seconds (a big batch on a CPU).
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)
ERROR_CODES = ("invalid_image", "payload_too_large", "image_too_large", "unsupported_media_type",
               "invalid_request", "not_found", "unauthorized", "forbidden", "request_timeout",
               "headers_too_large",
               "client_closed", "overloaded", "not_ready", "timeout", "internal", "conflict",
               "load_failed")
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


VERSION_LABELS = ("model", "version")
ModelEvent = Literal["load", "unload", "load_failed"]


class Metrics:
    """The registry's metrics. Those of one model version carry ``model`` and ``version``
    labels and are reached through ``for_version``; request metrics carry them too (empty for
    a request that named no model, e.g. /healthz)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        by_version = list(VERSION_LABELS)
        self.requests = Counter("dfine_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status", *by_version], registry=r)
        self.request_duration = Histogram(
            "dfine_request_duration_seconds", "Time from request to response",
            ["endpoint", *by_version], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram("dfine_queue_wait_seconds",
                                    "Time an image waited for its engine run", by_version,
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.preprocess = Histogram("dfine_preprocess_seconds", "Decode and resize, per image",
                                    by_version, buckets=LATENCY_BUCKETS_S, registry=r)
        self.inference = Histogram("dfine_inference_seconds", "One engine run (a whole batch)",
                                   by_version, buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("dfine_batch_size", "Images per engine run", by_version,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("dfine_queue_depth", "Images waiting for the engine",
                                 by_version, registry=r)
        self.queue_capacity = Gauge("dfine_queue_capacity", "MAX_QUEUE: images the queue holds",
                                    by_version, registry=r)
        self.inflight_batches = Gauge("dfine_inflight_batches", "Engine runs in progress",
                                      by_version, registry=r)
        self.images = Counter("dfine_images", "Images run through the engine", by_version,
                              registry=r)
        self.errors = Counter("dfine_errors", "Error responses by code", ["code"], registry=r)
        for code in ERROR_CODES:  # every series exists from the start, so rate() sees the 1st
            self.errors.labels(code=code)
        self.cancelled = Counter("dfine_cancelled", "Requests dropped before their run because "
                                 "the client went away", by_version, registry=r)
        self.expired = Counter("dfine_expired", "Requests dropped before their run because "
                               "their deadline passed", by_version, registry=r)
        self.engine_failures = Counter("dfine_engine_failures", "Engine runs that raised",
                                       by_version, registry=r)
        self.model_info = Info("dfine_model", "Each model version being served", by_version,
                               registry=r)
        self.model_events = Counter(
            "dfine_model_events", "Model versions loaded, unloaded, and failed to load",
            [*by_version, "event"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def for_version(self, model: str, version: int) -> VersionMetrics:
        return VersionMetrics(self, model, str(version))

    def model_event(self, model: str, version: int, event: ModelEvent) -> None:
        self.model_events.labels(model, str(version), event).inc()


class VersionMetrics:
    """One model version's metrics, its labels bound once (``labels()`` costs a lock and a
    dict lookup per call): the batcher's observer, and what the detector records."""

    _GAUGES = ("queue_depth", "queue_capacity", "inflight_batches")

    def __init__(self, root: Metrics, model: str, version: str) -> None:
        self.root, self.model, self.version = root, model, version
        labels = (model, version)
        self.preprocess = root.preprocess.labels(*labels)
        self._queue_wait = root.queue_wait.labels(*labels)
        self._inference = root.inference.labels(*labels)
        self._batch_size = root.batch_size.labels(*labels)
        self._images = root.images.labels(*labels)
        self._queue_depth = root.queue_depth.labels(*labels)
        self._inflight = root.inflight_batches.labels(*labels)
        self._cancelled = root.cancelled.labels(*labels)
        self._expired = root.expired.labels(*labels)
        self._engine_failures = root.engine_failures.labels(*labels)
        self.queue_capacity = root.queue_capacity.labels(*labels)

    def info(self, values: dict[str, str]) -> None:
        self.root.model_info.labels(self.model, self.version).info(values)

    def close(self) -> None:
        """The version is unloaded: its gauges and info go (a queue of an unloaded version is
        no queue); its counters and histograms stay, so that rate() over the change is
        right."""
        labels = (self.model, self.version)
        for name in self._GAUGES:
            with contextlib.suppress(KeyError):
                getattr(self.root, name).remove(*labels)
        with contextlib.suppress(KeyError):
            self.root.model_info.remove(*labels)

    # BatchObserver
    def queue_changed(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def inflight_changed(self, batches: int) -> None:
        self._inflight.set(batches)

    def batch_started(self, size: int, queue_waits_s: list[float]) -> None:
        self._batch_size.observe(size)
        self._images.inc(size)
        for wait in queue_waits_s:
            self._queue_wait.observe(wait)

    def batch_finished(self, size: int, run_s: float, ok: bool) -> None:
        self._inference.observe(run_s)
        if not ok:
            self._engine_failures.inc()

    def dropped(self, reason: DropReason) -> None:
        (self._cancelled if reason == "cancelled" else self._expired).inc()
