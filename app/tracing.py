"""Traces: the trace extension's settings (Triton's TraceSetting, global and per model) and
OpenTelemetry spans exported over OTLP/HTTP (the SDK's exporter, a batch span processor).

A sampled request has a root span (the request middleware, app.api.observe; gRPC's ModelInfer,
app.api.trace_routes.begin_grpc_trace) and, per image, child spans for decode, queue, engine
run and postprocess, opened by app.service with explicit times: the engine may run in another
process (FRONTENDS > 1), and ``_Row`` brings its run's perf_counter() times back (the same
CLOCK_MONOTONIC in every process), converted here to the epoch's nanoseconds.

Off (the default), nothing of OpenTelemetry is imported, and a request pays one attribute
check (``Tracing.active``) at its door and one context-variable read per image.

With FRONTENDS > 1 the settings are the service's: the engine process keeps them
(``TraceSettings`` without counting, its ``config``) and every front end follows them
(``Tracing.follow``); a change taken by a front end goes there (``Tracing.share``). The
counters (the rate's requests seen, the count's traces left) stay each front end's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from app.errors import InvalidRequest, ModelLoadError, Unsupported

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from app.config import Settings

log = logging.getLogger("dfine.tracing")

MODE = "opentelemetry"
LEVELS = ("OFF", "TIMESTAMPS")
MAX_UINT32 = 2**32 - 1
MAX_INT32 = 2**31 - 1
# What a flat answer lists, in this order (trace_level is a list of strings, the rest strings).
KEYS = ("trace_level", "trace_rate", "trace_count", "log_frequency", "trace_mode", "url")
UPDATABLE = ("trace_level", "trace_rate", "trace_count", "log_frequency")
SERVICE_NAME = "dfine-serve"


class InvalidSetting(InvalidRequest):
    """A trace setting that does not parse (422, gRPC INVALID_ARGUMENT, as the other settings'
    errors; Triton answers 400)."""


@dataclass(frozen=True)
class TraceValues:
    level: str = "OFF"  # OFF or TIMESTAMPS
    rate: int = 1000  # one trace in this many requests
    count: int = -1  # traces left; -1: no limit
    log_frequency: int = 0  # Triton's trace-file flushing: kept and reported, no effect here

    def report(self) -> dict[str, list[str]]:
        return {"trace_level": [self.level], "trace_rate": [str(self.rate)],
                "trace_count": [str(self.count)], "log_frequency": [str(self.log_frequency)]}


class _Sampling:
    """One setting in force, with its counters: the Nth request of every ``rate`` is traced
    (Triton's rule), while ``left`` (the count) is not 0. An update starts a new one
    (``started``: that update's number)."""

    __slots__ = ("left", "seen", "started", "values")

    def __init__(self, values: TraceValues, started: int = 0) -> None:
        self.values = values
        self.started = started
        self.seen = 0
        self.left = values.count

    @property
    def on(self) -> bool:
        return self.values.level == "TIMESTAMPS" and self.left != 0

    def sample(self) -> bool:
        if not self.on:
            return False
        self.seen += 1
        if self.seen % self.values.rate:
            return False
        if self.left > 0:
            self.left -= 1
        return True

    def current(self) -> TraceValues:
        """The values as reported: the count is what is left of it."""
        return replace(self.values, count=self.left)


Changes = dict[str, Any]  # a setting's new typed value, or None: clear it


@dataclass(frozen=True)
class ModelTrace:
    name: str
    own: tuple[tuple[str, Any], ...]  # the values given for the model
    values: TraceValues
    started: int


@dataclass(frozen=True)
class TraceConfig:
    """The settings as given, without counters (what the engine process keeps for the
    service). ``started``: the update that started each setting; a front end starts its
    counters again only for a setting whose update it has not followed yet."""

    global_: TraceValues
    started: int
    models: tuple[ModelTrace, ...]
    updates: int  # updates made so far: the next one's number follows



class TraceSettings:
    """The global setting and the models' own. A model's setting takes each value it was not
    given from the global one (then and after later global updates); a model none was given
    for uses the global setting, and its counters."""

    def __init__(self, start: TraceValues) -> None:
        self.start = start
        self.global_ = _Sampling(start)
        self.models: dict[str, tuple[Changes, _Sampling]] = {}
        self.updates = 0

    @property
    def on(self) -> bool:
        return self.global_.on or any(s.on for _, s in self.models.values())

    def sampling(self, model: str | None) -> _Sampling:
        entry = self.models.get(model) if model is not None else None
        return entry[1] if entry is not None else self.global_

    def values(self, model: str | None = None) -> TraceValues:
        return self.sampling(model).current()

    def update(self, model: str | None, changes: Changes) -> None:
        """Apply parsed ``changes`` (app.tracing.parse_changes) to the global setting or to
        ``model``'s; a None value clears it (back to the start value, or for a model back to
        the global one)."""
        if not changes:
            return
        self.updates += 1
        if model is None:
            fields = {_FIELD[k]: (getattr(self.start, _FIELD[k]) if v is None else v)
                      for k, v in changes.items()}
            self.global_ = _Sampling(replace(self.global_.current(), **fields), self.updates)
            for name, (own, _) in list(self.models.items()):
                if set(own) != set(UPDATABLE):  # it follows the global for some values
                    self.models[name] = (own, self._model_sampling(own))
            return
        own = dict(self.models[model][0]) if model in self.models else {}
        for key, value in changes.items():
            if value is None:
                own.pop(key, None)
            else:
                own[key] = value
        if own:
            self.models[model] = (own, self._model_sampling(own))
        else:
            self.models.pop(model, None)

    def _model_sampling(self, own: Changes) -> _Sampling:
        values = replace(self.global_.current(), **{_FIELD[k]: v for k, v in own.items()})
        return _Sampling(values, self.updates)

    def config(self) -> TraceConfig:
        return TraceConfig(self.global_.values, self.global_.started, tuple(
            ModelTrace(name, tuple(own.items()), sampling.values, sampling.started)
            for name, (own, sampling) in self.models.items()), self.updates)

    def follow(self, config: TraceConfig) -> None:
        """Take ``config`` (the service's settings): a setting it started anew starts its
        counters again here, the others keep theirs."""
        self.updates = config.updates
        if (self.global_.values, self.global_.started) != (config.global_, config.started):
            self.global_ = _Sampling(config.global_, config.started)
        models: dict[str, tuple[Changes, _Sampling]] = {}
        for model in config.models:
            entry = self.models.get(model.name)
            same = entry is not None and (entry[1].values, entry[1].started) == (
                model.values, model.started)
            models[model.name] = (dict(model.own), entry[1] if entry is not None and same
                                  else _Sampling(model.values, model.started))
        self.models = models


_FIELD = {"trace_level": "level", "trace_rate": "rate", "trace_count": "count",
          "log_frequency": "log_frequency"}


def _one(key: str, values: list[str]) -> str:
    if len(values) != 1:
        raise InvalidSetting(f"{key} takes one value; got {len(values)}")
    return values[0].strip()


def _integer(key: str, values: list[str], low: int, high: int) -> int:
    text = _one(key, values)
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 10):
        raise InvalidSetting(f"{key} must be an integer as a string, e.g. \"{low + 1}\"; "
                             f"got {text[:32]!r}")
    value = int(text)
    if not low <= value <= high:
        raise InvalidSetting(f"{key} must be from {low} to {high}; got {value}")
    return value


def _level(values: list[str]) -> str:
    levels = {v.strip().upper() for v in values}
    unknown = levels - {*LEVELS, "TENSORS"}
    if unknown:
        raise InvalidSetting(f"trace_level: unknown level(s) {sorted(unknown)}; levels: OFF, "
                             f"TIMESTAMPS")
    if "OFF" in levels and len(levels) > 1:
        raise InvalidSetting("Expect only one trace level 'OFF' is specified")
    if "TENSORS" in levels:
        raise Unsupported("trace_level TENSORS is not supported: spans carry the stages' "
                          "timestamps, never tensors (use TIMESTAMPS)")
    return levels.pop()


def parse_changes(raw: Mapping[str, list[str] | None], endpoint: str) -> Changes:
    """A TraceSetting update (each value a list of strings, as the gRPC message carries them;
    None or an empty list: clear) as typed values, or InvalidSetting / Unsupported before
    anything is changed. ``trace_mode`` may only name the mode in force."""
    changes: Changes = {}
    for key, values in raw.items():
        if key in ("trace_file", "url"):
            raise Unsupported(f"{key} can not be updated through network protocol" + (
                f": traces go to OTLP_ENDPOINT ({endpoint or 'not set'}), set at start"
                if key == "url" else ": this server exports spans over OTLP, to OTLP_ENDPOINT"))
        if key not in KEYS:
            raise InvalidSetting(f"unknown trace setting {key[:64]!r}; settings: "
                                 f"{', '.join(UPDATABLE)}")
        if key == "trace_mode":
            if values and _one(key, values).lower() != MODE:
                raise InvalidSetting(f"trace_mode is {MODE} on this server and can not be "
                                     f"changed")
            continue
        if not values:
            changes[key] = None
        elif key == "trace_level":
            changes[key] = _level(values)
        elif key == "trace_rate":
            changes[key] = _integer(key, values, 1, MAX_UINT32)
        elif key == "trace_count":
            changes[key] = _integer(key, values, -1, MAX_INT32)
        else:
            changes[key] = _integer(key, values, 0, MAX_UINT32)
    return changes


class _Clock:
    """perf_counter() seconds as the epoch's nanoseconds (what spans carry). The offset is
    measured between two perf_counter readings (the closest of a few tries), and again each
    minute, so that a wall-clock step reaches the spans."""

    REFRESH_S = 60.0

    def __init__(self) -> None:
        self._offset_ns = 0
        self._measured = -self.REFRESH_S
        self.refresh()

    def refresh(self) -> None:
        now = time.perf_counter()
        if now - self._measured < self.REFRESH_S:
            return
        best: tuple[int, int] | None = None
        for _ in range(5):
            before = time.perf_counter_ns()
            wall = time.time_ns()
            after = time.perf_counter_ns()
            if best is None or after - before < best[0]:
                best = (after - before, wall - (before + after) // 2)
        assert best is not None
        self._offset_ns = best[1]
        self._measured = now

    def ns(self, perf_s: float) -> int:
        return round(perf_s * 1e9) + self._offset_ns


class Row(Protocol):
    """An image's share of an engine run (app.service._Row)."""

    run_started: float
    run_finished: float
    batch_size: int


current_trace: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "current_trace", default=None)


class TraceShare(Protocol):
    """Where a front end's changes go with FRONTENDS > 1 (app.frontend.RemoteRegistry): to
    the engine process, which keeps the service's settings; each front end, this one
    included, then follows them (``Tracing.follow``) before the change is answered."""

    async def change_trace(self, model: str | None, changes: Changes) -> None: ...


def start_values(settings: Settings) -> TraceValues:
    """TRACE_LEVEL, TRACE_RATE and TRACE_COUNT: the settings at start."""
    return TraceValues(settings.trace_level.upper(), settings.trace_rate, settings.trace_count)


class Tracing:
    """The service's traces: settings (``settings``), sampling, and the exporter.

    ``active`` is true while some setting traces and spans have somewhere to go: the one thing
    a request checks when tracing is off."""

    share: TraceShare | None = None  # set in a front end of FRONTENDS > 1

    def __init__(self, start: TraceValues | None = None, endpoint: str = "",
                 default_model: Callable[[], str | None] | None = None) -> None:
        self.settings = TraceSettings(start or TraceValues())
        self.endpoint = endpoint
        self.default_model = default_model or (lambda: None)
        self.clock = _Clock()
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        if endpoint:
            self._provider, self._tracer = _exporting_tracer(endpoint)
        self.active = False
        self._refresh()

    @classmethod
    def from_settings(cls, settings: Settings,
                      default_model: Callable[[], str | None] | None = None) -> Tracing:
        """TRACE_LEVEL, TRACE_RATE, TRACE_COUNT at start; spans to OTLP_ENDPOINT."""
        start = start_values(settings)
        if start.level != "OFF" and not settings.otlp_endpoint:
            log.warning("TRACE_LEVEL=%s but OTLP_ENDPOINT is not set: no trace is made",
                        settings.trace_level)
        return cls(start, settings.otlp_endpoint, default_model)

    def _refresh(self) -> None:
        self.active = self._tracer is not None and self.settings.on

    def report(self, model: str | None = None) -> dict[str, list[str]]:
        """The settings in force (for ``model``: its own, else the global ones), each value a
        list of strings."""
        return {**self.settings.values(model).report(), "trace_mode": [MODE],
                "url": [self.endpoint]}

    def update(self, model: str | None, raw: Mapping[str, list[str] | None]) -> None:
        """Change this process's settings (``change`` is the service's)."""
        self.settings.update(model, parse_changes(raw, self.endpoint))
        self._refresh()

    async def change(self, model: str | None, raw: Mapping[str, list[str] | None]) -> None:
        """Change the service's settings: parsed here (InvalidSetting, Unsupported before
        anything changes), then this process's, or, in a front end, the engine process's,
        which every front end follows before this returns."""
        changes = parse_changes(raw, self.endpoint)
        if self.share is None:
            self.settings.update(model, changes)
            self._refresh()
        else:
            await self.share.change_trace(model, changes)

    def follow(self, config: TraceConfig) -> None:
        """Take the service's settings (a front end, from the engine process)."""
        self.settings.follow(config)
        self._refresh()

    def begin(self, name: str, model: str | None, carrier: Mapping[str, str], started: float,
              attributes: Mapping[str, Any] | None = None) -> RequestTrace | None:
        """A request's root span if this request is sampled (the current trace from now on, in
        this task and the tasks it starts, until ``finish``), else None. ``carrier``: the
        request's headers (lower-case names), where a W3C ``traceparent`` continues the
        caller's trace; ``started``: perf_counter() when the request began."""
        if self._tracer is None:
            return None
        sampling = self.settings.sampling(model if model is not None else self.default_model())
        if not sampling.sample():
            if not sampling.on:  # its count ran out
                self._refresh()
            return None
        if not sampling.on:
            self._refresh()
        self.clock.refresh()
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(carrier) if (
            "traceparent" in carrier) else None
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                       start_time=self.clock.ns(started),
                                       attributes=attributes)
        return RequestTrace(self, span)

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Export what is buffered, waiting ``timeout_s`` at most: the SDK's own shutdown
        waits out its export timeout and retries (10 s and more with a collector down), so
        it runs in a thread of its own that the process does not wait for past this."""
        provider = self._provider
        if provider is None:
            return
        self._provider = self._tracer = None
        self.active = False
        ending = threading.Thread(target=provider.shutdown, name="otlp-shutdown", daemon=True)
        ending.start()
        ending.join(timeout_s)


def _exporting_tracer(endpoint: str) -> tuple[TracerProvider, Tracer]:
    """A tracer whose spans go, in batches, to the OTLP/HTTP ``endpoint``. Every span it is
    asked for is recorded (sampling is ours, by TraceSetting: a caller's unsampled
    ``traceparent`` does not drop it). The batch processor's queue bounds the spans waiting
    (OTEL_BSP_* set its sizes and delay); OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    name the service."""
    if not endpoint.startswith(("http://", "https://")):
        raise ModelLoadError(f"OTLP_ENDPOINT must be an OTLP/HTTP URL, e.g. "
                             f"http://otel-collector:4318/v1/traces; got {endpoint[:200]!r}")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
        from opentelemetry.sdk.resources import SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    except ImportError as exc:
        raise ModelLoadError(f"OTLP_ENDPOINT is set but OpenTelemetry cannot start ({exc}): "
                             f"install the service's dependencies, or leave OTLP_ENDPOINT "
                             f"empty") from exc

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    resource = resource.merge(Resource({SERVICE_VERSION: "0.1.0"}))
    # (No shutdown at exit: Tracing.shutdown bounds it; the SDK's own would wait for it.)
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider, provider.get_tracer("dfine-serve")


class RequestTrace:
    """A sampled request: its root span, and its stages as child spans."""

    __slots__ = ("_context", "_token", "batch_size", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self.tracing = tracing
        self.span = span
        self.batch_size = 0  # the largest engine run its images took
        self._context: Context = set_span_in_context(span)
        self._token: contextvars.Token[RequestTrace | None] | None = current_trace.set(self)

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` of this request's span, returned to its caller."""
        context = self.span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    def stage(self, name: str, start: float, end: float,
              attributes: Mapping[str, Any] | None = None) -> None:
        """A child span from ``start`` to ``end`` (perf_counter() seconds)."""
        tracer = self.tracing._tracer
        if tracer is None:  # shut down meanwhile
            return
        clock = self.tracing.clock
        span = tracer.start_span(name, context=self._context, start_time=clock.ns(start),
                                 attributes=attributes)
        span.end(end_time=clock.ns(max(start, end)))

    def image(self, started: float, queued: float, rows: Sequence[Row], returned: float,
              finished: float) -> None:
        """One image's stages: decode (and resize, from ``started`` to ``queued``), its wait
        in the queue, each engine run its images took (the batch's size and run), and the
        postprocessing once the run's answer was back (``returned`` to ``finished``)."""
        runs = {row.run_started: row for row in rows}
        first = min(runs)
        self.stage("decode", started, queued)
        self.stage("queue", queued, max(queued, first))
        for row in runs.values():
            self.stage("engine_run", row.run_started, row.run_finished, {
                "dfine.batch_size": row.batch_size,
                # The run's start on the shared monotonic clock: the same in the spans of
                # every request that ran in this batch, and in no other.
                "dfine.run_id": f"{round(row.run_started * 1e9):x}"})
        self.stage("postprocess", returned, finished)
        self.batch_size = max(self.batch_size, *(row.batch_size for row in rows))

    def finish(self, status: int, attributes: Iterable[tuple[str, Any]] = (),
               ended: float | None = None,
               status_attribute: str = "http.response.status_code") -> None:
        """End the root span with the request's status (an HTTP status, or a gRPC call's as
        the service counts it: 5xx marks an error), and stop being the current trace."""
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        span.set_attribute(status_attribute, status)
        if self.batch_size:
            span.set_attribute("dfine.batch_size", self.batch_size)
        for key, value in attributes:
            if value not in (None, ""):
                span.set_attribute(key, value)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=self.tracing.clock.ns(time.perf_counter() if ended is None
                                                else ended))
        if self._token is not None:
            # (Finished in another context than it began: nothing to reset there.)
            with contextlib.suppress(ValueError):
                current_trace.reset(self._token)
            self._token = None
