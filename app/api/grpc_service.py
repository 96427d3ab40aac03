"""The Open Inference Protocol over gRPC (KServe v2 ``inference.GRPCInferenceService``, as
tritonclient.grpc calls it), in the service's process and event loop: the same registry,
batchers, admission places, limits, API key and metrics as the REST routes. The messages are
the generated ones tritonclient ships (``tritonclient.grpc``): no hand-made message format.

Errors are gRPC status codes (``STATUS_OF``); the standard health service
(``grpc.health.v1.Health``) answers probes, SERVING while the service is ready.

What a client can make the server hold is bounded before a message is read (see "Memory" in
docs/limits-and-reliability.md): each method is registered client-streaming over raw bytes,
so that its handler runs when the call's headers arrive, checks the key, and reads the one
message only with a turn to receive (app.api.grpc_gate) and within a deadline; messages are
walked before they are parsed (app.api.grpc_wire), in a worker thread. gRPC core bounds the
rest: the message size (checked on its length prefix, before it is buffered), streams per
connection, connections, idle connections, and compression (off unless GRPC_COMPRESSION).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from tritonclient.grpc import service_pb2 as pb

from app.api import shm_grpc
from app.api.deps import AppState
from app.api.grpc_gate import (
    HEALTH_TURNS,
    LOOKAHEAD_BYTES,
    SMALL_HOLD_S,
    SMALL_TURNS,
    ReceiveTurns,
    message_limit,
)
from app.api.grpc_wire import infer_response, parse_infer_request, parse_small, request_target
from app.api.keys import authorize, authorize_control
from app.api.shm import Regions
from app.api.trace_routes import begin_grpc_trace, grpc_trace_setting, trace_ended
from app.api.v2_codec import InferRequest
from app.api.v2_config import model_config, version_policy
from app.api.v2_extensions import SERVER_NAME, SERVER_VERSION, extensions
from app.api.v2_inference import (
    check_outputs,
    jobs,
    limits_for,
    model_metadata,
    requested_version,
    result_tensors,
)
from app.api.v2_logging import from_grpc, grpc_member, log_control
from app.api.v2_stats import read_samples, statistics
from app.batching import all_or_none
from app.errors import InvalidRequest, NotFound, NotReady, Overloaded, ReadTimeout, ServiceError
from app.service import Detector
from app.trim import IdleTrimmer

log = logging.getLogger("dfine.grpc")

SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# The error codes of app.errors, as gRPC says them.
STATUS_OF = {
    "invalid_image": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
    "unsupported_media_type": grpc.StatusCode.INVALID_ARGUMENT,
    "load_failed": grpc.StatusCode.INVALID_ARGUMENT,
    "payload_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "image_too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "not_ready": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "request_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
    "client_closed": grpc.StatusCode.CANCELLED,
    "internal": grpc.StatusCode.INTERNAL,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "unsupported": grpc.StatusCode.UNIMPLEMENTED,  # a 501
}


@dataclass
class Turn:
    """A call's turn to receive, given back once: when its message is admitted (places
    taken for it), refused, or the call ends; or, where a thread still parses the message
    after the call ended, when that thread is done (``keep_until``)."""

    turns: ReceiveTurns
    connection: str
    held: bool = True
    slow: bool = False
    kept: bool = False

    def give_back(self) -> None:
        if self.held and not self.kept:
            self._release()

    def keep_until(self, work: asyncio.Future[Any]) -> None:
        """Hold the turn until ``work`` (which holds the message) is done."""
        if self.held and not self.kept:
            self.kept = True
            work.add_done_callback(lambda _: self._release())

    def _release(self) -> None:
        self.held = False
        self.turns.give_back(self.connection, self.slow)


async def receive(context: Any, turns: ReceiveTurns, hold_s: float, timeout_s: float
                  ) -> tuple[bytes, Turn]:
    """The call's one message, read with a turn (which the caller gives back) within
    ``timeout_s`` of now. A message still arriving after ``hold_s`` goes on only as one of
    the turns' slow ones, else it is cut off; ReadTimeout (DEADLINE_EXCEEDED) either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    connection = context.peer() or ""
    await turns.take(connection, timeout_s)
    turn = Turn(turns, connection)
    read = asyncio.ensure_future(context.read())
    try:
        done, _ = await asyncio.wait({read}, timeout=max(0.0, min(hold_s,
                                                                   deadline - loop.time())))
        if not done:
            if not turns.go_slow(connection):
                raise ReadTimeout("the request message was still arriving when its turn to "
                                  "receive ended, and the turns of slow senders are taken")
            turn.slow = True
            async with asyncio.timeout_at(deadline):
                await read
        message = read.result()
    except TimeoutError:
        read.cancel()
        turn.give_back()
        raise ReadTimeout("the request message did not arrive in time") from None
    except BaseException:
        read.cancel()
        turn.give_back()
        raise
    if message is grpc.aio.EOF:
        turn.give_back()
        raise InvalidRequest("the call carried no request message")
    return message, turn


async def receive_small(context: Any, turns: ReceiveTurns, timeout_s: float, kind: Any) -> Any:
    """A call's small message (a name, a flag: it comes with the headers), as a ``kind``
    message; the turn is held SMALL_HOLD_S at most and given back once the message has come,
    not while the call runs (a load may last)."""
    message, turn = await receive(context, turns, SMALL_HOLD_S, timeout_s)
    turn.give_back()
    return parse_small(message, kind)


Work = Callable[[Any, dict[str, str], Turn | None], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """One method of the inference service: its request message, and whether it carries
    tensors (ModelInfer: the upload deadline, parsed in a thread) or changes what is served
    (the control key), or does either as its message says (``control_if``: the control key
    when it returns True)."""

    name: str
    request: Any
    infer: bool = False
    control: bool = False
    control_if: Callable[[Any], bool] | None = None


METHODS = (
    Method("ServerLive", pb.ServerLiveRequest), Method("ServerReady", pb.ServerReadyRequest),
    Method("ModelReady", pb.ModelReadyRequest),
    Method("ServerMetadata", pb.ServerMetadataRequest),
    Method("ModelMetadata", pb.ModelMetadataRequest),
    Method("ModelInfer", pb.ModelInferRequest, infer=True),
    Method("RepositoryIndex", pb.RepositoryIndexRequest),
    Method("RepositoryModelLoad", pb.RepositoryModelLoadRequest, control=True),
    Method("RepositoryModelUnload", pb.RepositoryModelUnloadRequest, control=True),
    # System and CUDA shared memory: control calls (a region names memory on the host).
    *(Method(name, request, control=True) for name, request, _ in shm_grpc.METHODS),
    Method("ModelConfig", pb.ModelConfigRequest),
    Method("ModelStatistics", pb.ModelStatisticsRequest),
    # Settings given: a change (the control key); none: a read (the API key).
    Method("LogSettings", pb.LogSettingsRequest, control_if=lambda r: bool(r.settings)),
    Method("TraceSetting", pb.TraceSettingRequest, control_if=lambda r: bool(r.settings)),
)


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


class InferenceService:
    def __init__(self, state: AppState, turns: ReceiveTurns, trimmer: IdleTrimmer) -> None:
        self.state = state
        self.registry = state.registry
        self.turns = turns  # ModelInfer's
        self.small_turns = ReceiveTurns(SMALL_TURNS, 1)
        self.calls = 0  # calls with their message, running (GRPC_MAX_INFLIGHT)
        # Memory back to the system once no call receives or runs (a message refused before
        # admission never reaches a detector's own trimmer). Not while calls run: a trim
        # under load would only contend for the allocator.
        self.trimmer = trimmer
        turns.on_idle = self._maybe_idle

    def _maybe_idle(self) -> None:
        if self.calls == 0 and self.turns.held == 0:
            self.trimmer.idle()

    def handler(self) -> grpc.GenericRpcHandler:
        """Every method client-streaming over raw bytes (see the module's docstring)."""
        table = {m.name: grpc.stream_unary_rpc_method_handler(
            self._serve(m), response_serializer=_serialize) for m in METHODS}
        return grpc.method_handlers_generic_handler(SERVICE, table)

    def _serve(self, method: Method) -> Callable[[Any, Any], Awaitable[Any]]:
        work: Work = getattr(self, method.name, None) or self._shm_call(method.name)

        async def serve(_requests: Any, context: Any) -> Any:
            return await self._call(method, context, work)

        return serve

    async def _call(self, method: Method, context: Any, work: Work) -> Any:
        """Check the key, receive and parse the message, run ``work`` (given a dict for the
        metrics' model labels), count it as REST requests are counted (by the status it
        ends with), and turn a ServiceError into its status; anything else is INTERNAL."""
        started = time.perf_counter()
        labels = {"model": "", "version": ""}
        status = 200
        turn: Turn | None = None
        trace = None
        try:
            headers = _headers(context)
            settings = self.state.settings
            if method.control:
                authorize_control(settings, headers)
            elif method.control_if is not None:
                _authorize_either(settings, headers)  # which one: once the message is read
            else:
                authorize(settings, headers)
            if method.infer:
                message, turn = await receive(context, self.turns,
                                              settings.upload_hold_ms / 1000,
                                              settings.upload_timeout_s)
                request = message
                if self.state.tracing.active:  # a sampled call's root span (app.tracing)
                    trace = begin_grpc_trace(self.state.tracing, method.name, message,
                                             headers, started, context)
            else:
                request = await receive_small(context, self.small_turns,
                                              settings.header_timeout_s, method.request)
                if method.control_if is not None and method.control_if(request):
                    authorize_control(settings, headers)
            with self._running():
                return await work(request, labels, turn)
        except ServiceError as exc:
            status = exc.status
            await self._abort(context, exc.code, STATUS_OF.get(exc.code), exc.message)
        except asyncio.CancelledError:
            status = 499
            raise
        except grpc.aio.AbortError:  # aborted already, with its own status
            raise
        except Exception:
            status = 500
            log.exception("gRPC %s failed", method.name)
            await self._abort(context, "internal", grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if turn is not None:
                turn.give_back()
            if trace is not None:
                trace_ended(trace, status, labels)
            endpoint = f"grpc:{method.name}"
            self.state.metrics.observe_request(endpoint, status, labels["model"],
                                               labels["version"], time.perf_counter() - started)
        raise AssertionError("abort returned")  # abort raises

    async def _abort(self, context: Any, code: str, status: grpc.StatusCode | None,
                     message: str) -> None:
        self.state.metrics.errors.labels(code=code).inc()
        await context.abort(status or grpc.StatusCode.INTERNAL, message)

    @contextlib.contextmanager
    def _running(self) -> Any:
        """A place among the GRPC_MAX_INFLIGHT calls that run at once (RESOURCE_EXHAUSTED
        past it). Calls still waiting for, or receiving, their message hold none: they are
        bounded by their turns, streams and deadline."""
        if self.calls >= self.state.settings.grpc_max_inflight:
            raise Overloaded()
        self.calls += 1
        try:
            yield
        finally:
            self.calls -= 1
            self._maybe_idle()

    def _shm_call(self, name: str) -> Work:
        handler = {n: h for n, _, h in shm_grpc.METHODS}[name]

        async def work(request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
            return await handler(self.state.shm, request)

        return work

    def _detector(self, name: str, version: str, labels: dict[str, str]) -> Detector:
        if self.state.draining:
            raise NotReady()
        detector = self.registry.resolve(name, requested_version(version))
        labels["model"], labels["version"] = detector.name, str(detector.version)
        return detector

    async def ServerLive(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        return pb.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        if self.registry.started and not self.registry.known(request.name):
            raise NotFound(f"unknown model {request.name[:128]!r}")
        ready = not self.state.draining and self.registry.model_ready(
            request.name, requested_version(request.version))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        shm = self.state.shm
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=extensions(shm is not None and shm.enabled))

    async def ModelMetadata(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        detector = self._detector(request.name, request.version, labels)
        meta = model_metadata(detector, [detector.version] if request.version
                              else self.registry.versions_of(request.name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, message: bytes, labels: dict[str, str], turn: Turn | None) -> Any:
        assert turn is not None  # ModelInfer's message is received with one
        # Names first, so that the model's limits bound the rest of the walk (the top level
        # alone: at most MAX_RECORDS fields, cheap enough for the event loop).
        name, version = request_target(message)
        detector = self._detector(name, version, labels)
        preparing = asyncio.ensure_future(asyncio.to_thread(_prepared, message, detector,
                                                            self.state.shm))
        try:
            parsed, request, work_items = await asyncio.shield(preparing)
        except asyncio.CancelledError:
            # The thread goes on with the message: it keeps the turn until it is done, so
            # that cancelled calls cannot have more messages in memory than there are turns.
            turn.keep_until(preparing)
            raise
        # Places for its images, or for its size in uploads if that is more: what it holds
        # is then counted as a REST body is (the docs' "Memory"); the turn goes to the next.
        places = max(len(work_items), math.ceil(len(message) / detector.settings.max_upload_bytes))
        await detector.acquire(places, detector.settings.admission_wait_ms / 1000
                               if places == 1 else 0)  # as the HTTP door does
        turn.give_back()
        try:
            results = await all_or_none(job() for job in work_items)
        finally:
            detector.release(places)
        tensors = result_tensors(results, parsed.outputs, detector)
        return infer_response(detector.name, detector.version, request.id, tensors, parsed)

    async def ModelConfig(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        detector = self._detector(request.name, request.version, labels)
        policy = await asyncio.to_thread(version_policy, detector.settings, detector.name)
        response = pb.ModelConfigResponse()
        json_format.ParseDict(model_config(detector, policy), response.config)
        return response

    async def ModelStatistics(self, request: Any, labels: dict[str, str], turn: Turn | None
                              ) -> Any:
        """Every loaded version (no name), a model's (no version), or one version."""
        if not request.name:
            if request.version:
                raise InvalidRequest("a version needs a model name")
            versions = [(d.name, d.version) for d in self.registry.detectors()]
        elif not request.version:
            self.registry.resolve(request.name)  # NotFound (or NotReady) as for its metadata
            versions = [(request.name, v) for v in self.registry.versions_of(request.name)]
        else:
            detector = self._detector(request.name, request.version, labels)
            versions = [(detector.name, detector.version)]
        samples = await asyncio.to_thread(read_samples, self.state.metrics.registry)
        return json_format.ParseDict(statistics(samples, versions),
                                     pb.ModelStatisticsResponse())

    async def LogSettings(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        control = log_control(self.state.settings.log_format)
        current = await control.change(from_grpc(request.settings)) if request.settings \
            else control.current
        response = pb.LogSettingsResponse()
        for key, value in current.json().items():
            setattr(response.settings[key], grpc_member(key), value)
        return response

    async def TraceSetting(self, request: Any, labels: dict[str, str], turn: Turn | None
                           ) -> Any:
        return await grpc_trace_setting(self.state, request)

    async def RepositoryIndex(self, request: Any, labels: dict[str, str], turn: Turn | None) -> Any:
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            entry(name=s.name, version=str(s.version) if s.version else "",
                  state=s.state, reason=s.reason)
            for s in self.registry.index(ready_only=request.ready)])

    async def RepositoryModelLoad(self, request: Any, labels: dict[str, str], turn: Turn | None
                                  ) -> Any:
        if request.parameters:
            raise InvalidRequest("load parameters (a config or files in the request) are "
                                 "not supported: put the model in the repository")
        await self.registry.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, labels: dict[str, str], turn: Turn | None
                                    ) -> Any:
        await self.registry.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _prepared(message: bytes, detector: Detector, regions: Regions | None
              ) -> tuple[InferRequest, Any, list[Any]]:
    """A ModelInfer message parsed within the model's limits, and its images as engine jobs
    (one thread hop for both: this is every gRPC inference's path)."""
    parsed, request = parse_infer_request(message, limits_for(detector), regions)
    check_outputs(parsed.outputs)
    return parsed, request, jobs(parsed, detector)


def _authorize_either(settings: Any, headers: dict[str, str]) -> None:
    """The control key or the API key (a call that the message makes a read or a change)."""
    try:
        authorize_control(settings, headers)
    except ServiceError:
        authorize(settings, headers)


def _headers(context: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ())
            if isinstance(v, str)}


class HealthService:
    """The standard health service, with turns of its own to receive (never behind
    inference calls, never refused for their sake) and the small-message deadline."""

    def __init__(self, settings: Any, servicer: health_aio.HealthServicer) -> None:
        self.settings = settings
        self.servicer = servicer
        self.turns = ReceiveTurns(HEALTH_TURNS, 1)

    def handler(self) -> grpc.GenericRpcHandler:
        serialize = _serialize
        return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {
            "Check": grpc.stream_unary_rpc_method_handler(
                self.check, response_serializer=serialize),
            "Watch": grpc.stream_stream_rpc_method_handler(
                self.watch, response_serializer=serialize)})

    async def _request(self, context: Any) -> Any:
        try:
            return await receive_small(context, self.turns, self.settings.header_timeout_s,
                                       health_pb2.HealthCheckRequest)
        except ServiceError as exc:
            await context.abort(STATUS_OF.get(exc.code, grpc.StatusCode.INTERNAL), exc.message)
            raise AssertionError("abort returned") from None  # abort raises

    async def check(self, _requests: Any, context: Any) -> Any:
        return await self.servicer.Check(await self._request(context), context)

    async def watch(self, _requests: Any, context: Any) -> None:
        await self.servicer.Watch(await self._request(context), context)


def grpc_options(settings: Any) -> list[tuple[str, Any]]:
    """gRPC core's own bounds (each checked against grpc core's sources and on a real server:
    tests/integration/test_hostile_grpc.py)."""
    return [
        # Checked on the 5-byte length prefix: a larger message is refused before it is read.
        ("grpc.max_receive_message_length", message_limit(settings)),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # FRONTENDS=N: every front end binds the port (the kernel spreads the connections);
        # else a second server on the port fails to start rather than share it.
        ("grpc.so_reuseport", 1 if settings.frontends > 1 else 0),
        # HTTP/2 MAX_CONCURRENT_STREAMS: more are refused with REFUSED_STREAM (clients wait).
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        # More connections are closed as they are accepted: HTTP keeps its descriptors.
        ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
        ("grpc.max_connection_idle_ms", int(settings.grpc_idle_timeout_s * 1000)),
        # A connection that never sends HTTP/2's preface is closed.
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
        # A stream not being read holds at most its initial window.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", LOOKAHEAD_BYTES),
        # gzip and deflate expand up to the message limit: 16 KB became 16 MiB. Off, such a
        # call gets UNIMPLEMENTED.
        ("grpc.compression_enabled_algorithms_bitset",
         0b111 if settings.grpc_compression else 0b001),
    ]


class GrpcServer:
    """The gRPC server beside uvicorn: started in the lifespan, stopped after the drain."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        settings = state.settings
        # Each call receiving may hold a whole message: GRPC_MAX_RECEIVING of them at once,
        # half of them from one connection at most.
        turns = ReceiveTurns(settings.grpc_max_receiving,
                             (settings.grpc_max_receiving + 1) // 2,
                             slow_slots=max(1, settings.grpc_max_receiving // 2))
        self.server = grpc.aio.server(options=grpc_options(settings))
        self.inference = InferenceService(state, turns, IdleTrimmer())
        self.health = health_aio.HealthServicer()
        self.server.add_generic_rpc_handlers(
            (self.inference.handler(), HealthService(settings, self.health).handler()))
        self._watch: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.state.settings
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        await self.server.start()
        self._watch = asyncio.get_running_loop().create_task(self._follow_readiness())
        log.info("gRPC (Open Inference Protocol, health) on %s:%d", settings.host, self.port)

    async def _follow_readiness(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            status = serving if self.state.ready else not_serving
            for service in ("", SERVICE):
                await self.health.set(service, status)
            await asyncio.sleep(0.2)

    async def stop(self, grace_s: float) -> None:
        """After the registry drained: RPCs still running get ``grace_s`` to finish."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
