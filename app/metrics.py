"""Prometheus metrics (base units, ``_total`` counters, ``_seconds`` histograms).

Each app owns its registry, so several apps (tests) never share counters.
Average batch size = dfine_images_total / dfine_batch_size_count, as Triton reports it.
"""

from __future__ import annotations

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
               "invalid_request", "not_found", "unauthorized", "request_timeout",
               "headers_too_large",
               "client_closed", "overloaded", "not_ready", "timeout", "internal")
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("dfine_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.request_duration = Histogram(
            "dfine_request_duration_seconds", "Time from request to response",
            ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram("dfine_queue_wait_seconds",
                                    "Time an image waited for its engine run",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.preprocess = Histogram("dfine_preprocess_seconds", "Decode and resize, per image",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.inference = Histogram("dfine_inference_seconds", "One engine run (a whole batch)",
                                   buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("dfine_batch_size", "Images per engine run",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("dfine_queue_depth", "Images waiting for the engine",
                                 registry=r)
        self.queue_capacity = Gauge("dfine_queue_capacity", "MAX_QUEUE: images the queue holds",
                                    registry=r)
        self.inflight_batches = Gauge("dfine_inflight_batches", "Engine runs in progress",
                                      registry=r)
        self.images = Counter("dfine_images", "Images run through the engine", registry=r)
        self.errors = Counter("dfine_errors", "Error responses by code", ["code"], registry=r)
        for code in ERROR_CODES:  # every series exists from the start, so rate() sees the 1st
            self.errors.labels(code=code)
        self.cancelled = Counter("dfine_cancelled", "Requests dropped before their run because "
                                 "the client went away", registry=r)
        self.expired = Counter("dfine_expired", "Requests dropped before their run because "
                               "their deadline passed", registry=r)
        self.engine_failures = Counter("dfine_engine_failures", "Engine runs that raised",
                                       registry=r)
        self.model_info = Info("dfine_model", "The model being served", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # BatchObserver
    def queue_changed(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def inflight_changed(self, batches: int) -> None:
        self.inflight_batches.set(batches)

    def batch_started(self, size: int, queue_waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        self.images.inc(size)
        for wait in queue_waits_s:
            self.queue_wait.observe(wait)

    def batch_finished(self, size: int, run_s: float, ok: bool) -> None:
        self.inference.observe(run_s)
        if not ok:
            self.engine_failures.inc()

    def dropped(self, reason: DropReason) -> None:
        (self.cancelled if reason == "cancelled" else self.expired).inc()
