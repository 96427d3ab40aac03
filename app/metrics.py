"""Prometheus metrics (base units, ``_total`` counters, ``_seconds`` histograms).

Single-process mode (FRONTENDS=1, PROMETHEUS_MULTIPROC_DIR unset): each app owns its registry, so
several apps (tests) never share counters.

Multiprocess mode (the supervisor sets PROMETHEUS_MULTIPROC_DIR, or PROMETHEUS_MULTIPROCESS_DIR,
for every child): each process writes its series to its own files there, and /metrics, in any
front end, merges them into one view of the service (``app.metrics_view``). The names, types,
labels and meanings are the same in both modes. The engine's gauges use the ``livemax`` mode:
only the engine sets them, so the max is its value; ``live`` drops a dead engine's file when the
supervisor marks it dead (``mark_process_dead``), so its stale values vanish; no ``pid`` label
is added, so the series are those of one process and dashboards, alerts and the HPA's rule
match them as before; and a max, unlike a sum, is not doubled while a restarted engine has
written and the dead one is not yet marked. A series cannot be deleted from a file, so an
unloaded version's gauges and model info are set to NaN, which the view leaves out.

Average batch size = dfine_images_total / dfine_batch_size_count, as Triton reports it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, Literal, Protocol, TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    Summary,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.metrics import MetricWrapperBase

from app.batching import DropReason
from app.metrics_view import service_registry

# From well under a millisecond (a cached TensorRT run) to seconds (a big batch on a CPU).
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)
ERROR_CODES = ("invalid_image", "payload_too_large", "image_too_large", "unsupported_media_type",
               "invalid_request", "not_found", "unauthorized", "forbidden", "request_timeout",
               "headers_too_large",
               "client_closed", "overloaded", "not_ready", "timeout", "internal", "conflict",
               "load_failed", "unsupported", "already_exists")
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# The requests that run a model (the statistics' success and fail: app.api.v2_stats).
INFERENCE_ENDPOINTS = frozenset({
    "/detect", "/detect/batch", "/detect/render", "/v2/models/{name}/infer",
    "/v2/models/{name}/versions/{version}/infer", "grpc:ModelInfer"})


VERSION_LABELS = ("model", "version")
ModelEvent = Literal["load", "unload", "load_failed"]
MULTIPROCESS_DIR_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")
SUPERVISOR_PID_VARIABLE = "DFINE_SUPERVISOR_PID"
MODEL_INFO_HELP = "Each model version being served"
# Multiprocess mode: the engine's gauges of one version (the only process that sets them).
ENGINE_GAUGE_MODE: Literal["livemax"] = "livemax"

_M = TypeVar("_M", bound=MetricWrapperBase)

# Multiprocess mode: a process's values live in its files, and two objects of one series would
# each count from their own copy and overwrite the other's counts; so every Metrics of a process
# shares one object per metric (keyed by name, and for the model info by its label names).
_process_metrics: dict[str, MetricWrapperBase] = {}


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, or None: single-process mode."""
    for variable in MULTIPROCESS_DIR_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def _write_values_to_files(path: str) -> None:
    """prometheus_client chooses where values live when it is first imported, from
    PROMETHEUS_MULTIPROC_DIR: the other name, or an import before the variable was set, needs
    the switch made here (before any metric exists)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if not getattr(prometheus_values.ValueClass, "_multiprocess", False):
        prometheus_values.ValueClass = (
            prometheus_values.MultiProcessValue())  # type: ignore[no-untyped-call]


def _supervisor_pid() -> int:
    """The root of the service's process tree; this process where none is named."""
    with contextlib.suppress(ValueError):
        return int(os.environ.get(SUPERVISOR_PID_VARIABLE, ""))
    return os.getpid()


def _process_wide(key: str, build: Callable[[], _M]) -> _M:
    made = _process_metrics.get(key)
    if made is None:
        made = _process_metrics[key] = build()
    return cast(_M, made)


def _drop_series(gauge: Gauge, labels: dict[str, str]) -> None:
    """Multiprocess mode: this process's series of ``gauge`` that carry ``labels`` go to NaN,
    which the view leaves out (a series cannot be deleted from a file). Only those this process
    has: it writes none where it wrote none."""
    live = [sample.labels for family in gauge.collect() for sample in family.samples
            if labels.items() <= sample.labels.items() and not math.isnan(sample.value)]
    for series in live:
        gauge.labels(**series).set(math.nan)


class _ModelInfo(Protocol):
    def set(self, model: str, version: str, values: dict[str, str]) -> None: ...

    def remove(self, model: str, version: str) -> None: ...


class _InfoMetric:
    """Single-process mode: prometheus_client's Info."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.info = Info("dfine_model", MODEL_INFO_HELP, VERSION_LABELS, registry=registry)

    def set(self, model: str, version: str, values: dict[str, str]) -> None:
        self.info.labels(model, version).info(values)

    def remove(self, model: str, version: str) -> None:
        with contextlib.suppress(KeyError):
            self.info.remove(model, version)


class _InfoGauges:
    """Multiprocess mode, where Info does not work: a gauge ``dfine_model_info`` at 1 gives
    the same exposition. Its label names are the version's and the info's keys, so there is a
    gauge per set of keys; a version's info replaced or removed is set to NaN (dropped from the
    view)."""

    _KEY = "dfine_model_info:"

    def set(self, model: str, version: str, values: dict[str, str]) -> None:
        keys = tuple(sorted(values))
        if set(keys) & set(VERSION_LABELS):
            raise ValueError(f"model info keys overlap the labels {VERSION_LABELS}: {keys}")
        self.remove(model, version)
        gauge = _process_wide(self._KEY + ",".join(keys), lambda: Gauge(
            "dfine_model_info", MODEL_INFO_HELP, [*VERSION_LABELS, *keys], registry=None,
            multiprocess_mode=ENGINE_GAUGE_MODE))
        gauge.labels(model, version, *(values[key] for key in keys)).set(1)

    def remove(self, model: str, version: str) -> None:
        for key, gauge in list(_process_metrics.items()):
            if key.startswith(self._KEY):
                assert isinstance(gauge, Gauge)
                _drop_series(gauge, {"model": model, "version": version})


class Metrics:
    """The registry's metrics. Those of one model version carry ``model`` and ``version``
    labels and are reached through ``for_version``; request metrics carry them too (empty for
    a request that named no model, e.g. /healthz). ``registry`` is what /metrics exposes."""

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is None:
            self.registry = CollectorRegistry()
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        else:
            _write_values_to_files(self.multiprocess_dir)
            self.registry = service_registry(self.multiprocess_dir, _supervisor_pid())
        by_version = list(VERSION_LABELS)
        self.requests = self._define(Counter, "dfine_requests",
                                     "HTTP requests by endpoint and status",
                                     ["endpoint", "status", *by_version])
        self.request_duration = self._define(
            Histogram, "dfine_request_duration_seconds", "Time from request to response",
            ["endpoint", *by_version], buckets=LATENCY_BUCKETS_S)
        self.queue_wait = self._define(Histogram, "dfine_queue_wait_seconds",
                                       "Time an image waited for its engine run", by_version,
                                       buckets=LATENCY_BUCKETS_S)
        self.preprocess = self._define(Histogram, "dfine_preprocess_seconds",
                                       "Decode and resize, per image", by_version,
                                       buckets=LATENCY_BUCKETS_S)
        self.inference = self._define(Histogram, "dfine_inference_seconds",
                                      "One engine run (a whole batch)", by_version,
                                      buckets=LATENCY_BUCKETS_S)
        self.batch_size = self._define(Histogram, "dfine_batch_size", "Images per engine run",
                                       by_version, buckets=BATCH_BUCKETS)
        self.queue_depth = self._define(Gauge, "dfine_queue_depth",
                                        "Images waiting for the engine", by_version,
                                        multiprocess_mode=ENGINE_GAUGE_MODE)
        self.queue_capacity = self._define(Gauge, "dfine_queue_capacity",
                                           "MAX_QUEUE: images the queue holds", by_version,
                                           multiprocess_mode=ENGINE_GAUGE_MODE)
        self.inflight_batches = self._define(Gauge, "dfine_inflight_batches",
                                             "Engine runs in progress", by_version,
                                             multiprocess_mode=ENGINE_GAUGE_MODE)
        self.images = self._define(Counter, "dfine_images", "Images run through the engine",
                                   by_version)
        self.errors = self._define(Counter, "dfine_errors", "Error responses by code", ["code"])
        for code in ERROR_CODES:  # every series exists from the start, so rate() sees the 1st
            self.errors.labels(code=code)
        self.cancelled = self._define(Counter, "dfine_cancelled", "Requests dropped before "
                                      "their run because the client went away", by_version)
        self.expired = self._define(Counter, "dfine_expired", "Requests dropped before their "
                                    "run because their deadline passed", by_version)
        self.engine_failures = self._define(Counter, "dfine_engine_failures",
                                            "Engine runs that raised", by_version)
        # What Triton's statistics need beside the above (app.api.v2_stats).
        self.inference_requests = self._define(
            Summary, "dfine_inference_requests_seconds",
            "Requests that ran a model version (/detect*, the Open Inference Protocol's infer), "
            "by outcome (success: answered 200, else fail): time from request to response",
            [*by_version, "outcome"])
        self.postprocess = self._define(Histogram, "dfine_postprocess_seconds",
                                        "Detections from an engine run's rows, per image",
                                        by_version, buckets=LATENCY_BUCKETS_S)
        self.batch_runs = self._define(Summary, "dfine_batch_runs_seconds",
                                       "Engine runs that succeeded, by batch size",
                                       [*by_version, "batch_size"])
        self.last_inference = self._define(
            Gauge, "dfine_last_inference_timestamp_seconds",
            "When the version's last successful engine run ended (Unix time)", by_version,
            multiprocess_mode="max")
        self._model_info: _ModelInfo = (_InfoMetric(self.registry) if self.multiprocess_dir is None
                                        else _InfoGauges())
        self.model_events = self._define(
            Counter, "dfine_model_events", "Model versions loaded, unloaded, and failed to load",
            [*by_version, "event"])

        self.streams = StreamMetrics(self)
        self._request_series: dict[tuple[str, int, str, str],
                                   tuple[Counter, Histogram, Summary | None]] = {}

    def _define(self, kind: type[_M], name: str, documentation: str,
                labelnames: Sequence[str], **kwargs: Any) -> _M:
        if self.multiprocess_dir is None:
            return kind(name, documentation, labelnames, registry=self.registry, **kwargs)
        # Not in the exposed registry: that one reads every process's files.
        return _process_wide(name, lambda: kind(name, documentation, labelnames, registry=None,
                                                **kwargs))

    def observe_request(self, endpoint: str, status: int, model: str, version: str,
                        elapsed_s: float) -> None:
        """A request answered (REST or gRPC): its count, duration and, where it ran a model,
        its outcome."""
        key = (endpoint, status, model, version)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = self._series_of_request(*key)
        count, duration, outcome = series
        count.inc()
        duration.observe(elapsed_s)
        if outcome is not None:
            outcome.observe(elapsed_s)

    def _series_of_request(self, endpoint: str, status: int, model: str, version: str
                           ) -> tuple[Counter, Histogram, Summary | None]:
        """The series ``observe_request`` moves for such a request, looked up once: a
        ``labels()`` call costs a lock and a tuple each time. (Bounded: endpoints are route
        templates, versions those loaded, and these series are never removed.)"""
        return (self.requests.labels(endpoint, str(status), model, version),
                self.request_duration.labels(endpoint, model, version),
                self.inference_requests.labels(model, version,
                                               "success" if status == 200 else "fail")
                if model and endpoint in INFERENCE_ENDPOINTS else None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def for_version(self, model: str, version: int) -> VersionMetrics:
        return VersionMetrics(self, model, str(version))

    def model_event(self, model: str, version: int, event: ModelEvent) -> None:
        self.model_events.labels(model, str(version), event).inc()

    def set_model_info(self, model: str, version: str, values: dict[str, str]) -> None:
        self._model_info.set(model, version, values)

    def drop_version_series(self, model: str, version: str) -> None:
        """An unloaded version's gauges and model info go; its counters stay."""
        for gauge in (self.queue_depth, self.queue_capacity, self.inflight_batches):
            self.drop_gauge_series(gauge, {"model": model, "version": version})
        self._model_info.remove(model, version)

    def drop_gauge_series(self, gauge: Gauge, labels: dict[str, str]) -> None:
        """The series of ``gauge`` with these labels (all of them, in order) goes."""
        if self.multiprocess_dir is None:
            with contextlib.suppress(KeyError):
                gauge.remove(*labels.values())
        else:
            _drop_series(gauge, labels)


class _EngineGauges:
    """One version's gauges, which only the process that owns its queue sets."""

    def __init__(self, root: Metrics, labels: tuple[str, str]) -> None:
        self.queue_depth: Gauge = root.queue_depth.labels(*labels)
        self.queue_capacity: Gauge = root.queue_capacity.labels(*labels)
        self.inflight_batches: Gauge = root.inflight_batches.labels(*labels)


class VersionMetrics:
    """One model version's metrics, its labels bound once (``labels()`` costs a lock and a
    dict lookup per call): the batcher's observer, and what the detector records.

    Its gauges come into being together when first used (in multiprocess mode: in the engine,
    which sets ``queue_capacity`` as it routes to the version), so that a front end, which never
    sets them, writes no zeros that would outlive the engine's values; in single-process mode
    at once, as the process that made them owns the queue."""

    def __init__(self, root: Metrics, model: str, version: str) -> None:
        self.root, self.model, self.version = root, model, version
        labels = (model, version)
        self.preprocess = root.preprocess.labels(*labels)
        self._queue_wait = root.queue_wait.labels(*labels)
        self._inference = root.inference.labels(*labels)
        self._batch_size = root.batch_size.labels(*labels)
        self._images = root.images.labels(*labels)
        self._cancelled = root.cancelled.labels(*labels)
        self._expired = root.expired.labels(*labels)
        self._engine_failures = root.engine_failures.labels(*labels)
        self.postprocess = root.postprocess.labels(*labels)
        self._last_inference = root.last_inference.labels(*labels)
        self._batch_runs: dict[int, Summary] = {}
        if root.multiprocess_dir is None:
            _ = self._gauges

    @cached_property
    def _gauges(self) -> _EngineGauges:
        return _EngineGauges(self.root, (self.model, self.version))

    @property
    def queue_capacity(self) -> Gauge:
        return self._gauges.queue_capacity

    def info(self, values: dict[str, str]) -> None:
        self.root.set_model_info(self.model, self.version, values)

    def close(self) -> None:
        """The version is unloaded: its gauges and info go (a queue of an unloaded version is
        no queue); its counters and histograms stay, so that rate() over the change is
        right."""
        self.root.drop_version_series(self.model, self.version)

    # BatchObserver
    def queue_changed(self, depth: int) -> None:
        self._gauges.queue_depth.set(depth)

    def inflight_changed(self, batches: int) -> None:
        self._gauges.inflight_batches.set(batches)

    def batch_started(self, size: int, queue_waits_s: list[float]) -> None:
        self._batch_size.observe(size)
        self._images.inc(size)
        for wait in queue_waits_s:
            self._queue_wait.observe(wait)

    def batch_finished(self, size: int, run_s: float, ok: bool) -> None:
        self._inference.observe(run_s)
        if not ok:
            self._engine_failures.inc()
            return
        runs = self._batch_runs.get(size)
        if runs is None:
            runs = self._batch_runs[size] = self.root.batch_runs.labels(
                self.model, self.version, str(size))
        runs.observe(run_s)
        self._last_inference.set(time.time())

    def dropped(self, reason: DropReason) -> None:
        (self._cancelled if reason == "cancelled" else self._expired).inc()


STREAM_STATES = ("connecting", "running", "reconnecting", "ended", "failed", "stopped")
LAG_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
                 30.0)


class StreamMetrics:
    """Video (app.streams): a server-side stream's series carry its id; a stream deleted
    takes its gauges with it, its counters stay (rate() over its end stays right)."""

    def __init__(self, root: Metrics) -> None:
        define = root._define
        self._root = root
        self.received = define(Counter, "dfine_stream_frames_received",
                               "Frames decoded from a stream's source", ["stream"])
        self.processed = define(Counter, "dfine_stream_frames_processed",
                                "Frames of a stream whose detections were published", ["stream"])
        self.dropped = define(Counter, "dfine_stream_frames_dropped",
                              "Frames of a stream not processed: behind (a newer frame won), "
                              "failed (its detection failed)", ["stream", "reason"])
        self.reconnects = define(Counter, "dfine_stream_reconnects",
                                 "Times a stream's lost source was connected again", ["stream"])
        self.lag = define(Gauge, "dfine_stream_lag_seconds", "The last published frame's lag: "
                          "from its decode to its detections published", ["stream"],
                          multiprocess_mode="livesum")
        self.frame_lag = define(Histogram, "dfine_stream_frame_lag_seconds",
                                "Each published frame's lag, every stream", [],
                                buckets=LAG_BUCKETS_S)
        self.up = define(Gauge, "dfine_stream_up", "1 while a stream is running, else 0",
                         ["stream"], multiprocess_mode="livesum")
        self.by_state = define(Gauge, "dfine_streams", "Server-side streams by state", ["state"],
                               multiprocess_mode="livesum")
        self.client_frames = define(Counter, "dfine_client_frames",
                                    "Frames sent by WebSocket clients, by outcome", ["outcome"])
        self.client_sessions = define(Gauge, "dfine_client_sessions",
                                      "Open WebSocket sessions of clients sending frames", [],
                                      multiprocess_mode="livesum")
        for outcome in ("processed", "dropped", "failed"):
            self.client_frames.labels(outcome)

    def count_states(self, states: list[str]) -> None:
        for state in STREAM_STATES:
            self.by_state.labels(state).set(states.count(state))

    def forget(self, stream: str, lag: bool = True) -> None:
        """A deleted stream's gauges go (one that ended or was stopped: its up gauge, which
        DfineStreamDown watches)."""
        for gauge in (self.lag, self.up) if lag else (self.up,):
            self._root.drop_gauge_series(gauge, {"stream": stream})
