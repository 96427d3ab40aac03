"""The Open Inference Protocol over gRPC (KServe v2 ``inference.GRPCInferenceService``, as
tritonclient.grpc calls it), in the service's process and event loop: the same registry,
batchers, admission places, limits, API key and metrics as the REST routes. The messages and
the service stub are the generated modules tritonclient ships (``tritonclient.grpc``): no
hand-made wire format.

Errors are gRPC status codes (``STATUS_OF``); the standard health service
(``grpc.health.v1.Health``) answers probes, SERVING while the service is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from app.api.deps import AppState
from app.api.uploads import MULTIPART_OVERHEAD_BYTES
from app.api.v2_codec import (
    NUMERIC,
    InferRequest,
    Limits,
    Tensor,
    bytes_elements,
    numeric_values,
)
from app.api.v2_inference import (
    all_or_none,
    check_outputs,
    jobs,
    limits_for,
    model_metadata,
    requested_version,
    result_tensors,
)
from app.errors import InvalidRequest, NotFound, NotReady, ServiceError, Unauthorized
from app.service import Detector

log = logging.getLogger("dfine.grpc")

T = TypeVar("T")
SERVICE = "inference.GRPCInferenceService"
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
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
    "client_closed": grpc.StatusCode.CANCELLED,
    "internal": grpc.StatusCode.INTERNAL,
}
_TYPED = {"FP32": "fp32_contents", "INT64": "int64_contents", "INT32": "int_contents",
          "BYTES": "bytes_contents"}


def message_limit(state: AppState) -> int:
    """The largest request a client may send: MAX_BATCH_IMAGES files of MAX_UPLOAD_BYTES."""
    settings = state.settings
    return settings.max_batch_images * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES


def _tensors(request: Any, limits: Limits) -> dict[str, Tensor]:
    """The request's inputs, from raw_input_contents (tritonclient's way) or typed contents,
    with the REST form's bounds."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest("raw_input_contents must hold one entry per input")
    tensors = {}
    for index, spec in enumerate(request.inputs):
        shape = list(spec.shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input {spec.name[:64]}: a shape of sizes")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        budget = limits.max_images if spec.datatype == "BYTES" else limits.max_elements
        if count > budget:
            raise InvalidRequest(f"input {spec.name[:64]}: {count} elements; at most {budget} "
                                 f"for this model")
        value: np.ndarray | list[memoryview]
        if raw:
            data = memoryview(raw[index])
            value = (bytes_elements(data, spec.name, limits) if spec.datatype == "BYTES"
                     else numeric_values(data, spec.datatype, spec.name))
        else:
            field = _TYPED.get(spec.datatype)
            if field is None:
                raise InvalidRequest(f"input {spec.name[:64]}: datatype {spec.datatype} is "
                                     f"not accepted")
            contents = getattr(spec.contents, field)
            if spec.datatype == "BYTES":
                if any(len(item) > limits.max_image_bytes for item in contents):
                    raise InvalidRequest(f"input {spec.name[:64]}: an image is over "
                                         f"{limits.max_image_bytes} bytes")
                value = [memoryview(item) for item in contents]
            else:
                value = np.asarray(contents, NUMERIC[spec.datatype])
        if len(value) != count:
            raise InvalidRequest(f"input {spec.name[:64]}: {len(value)} elements for shape "
                                 f"{shape[:8]}")
        if isinstance(value, np.ndarray):
            value = value.reshape(shape)
        tensors[spec.name] = Tensor(spec.name, spec.datatype, shape, value)
    return tensors


def _parsed(request: Any, limits: Limits) -> InferRequest:
    wanted = [o.name for o in request.outputs] or None
    return InferRequest(request.id or None, _tensors(request, limits), wanted)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.registry = state.registry

    async def _call(self, name: str, context: grpc.aio.ServicerContext,
                    work: Callable[[dict[str, str]], Awaitable[T]]) -> T:
        """Check the API key, run ``work`` (given a dict for the metrics' model labels),
        count it as REST requests are counted, and turn a ServiceError into its status."""
        started = time.perf_counter()
        labels = {"model": "", "version": ""}
        status = 200
        try:
            self._authorize(context)
            return await work(labels)
        except ServiceError as exc:
            status = exc.status
            self.state.metrics.errors.labels(code=exc.code).inc()
            await context.abort(STATUS_OF.get(exc.code, grpc.StatusCode.UNKNOWN), exc.message)
            raise AssertionError("abort returned") from None  # abort raises
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            endpoint = f"grpc:{name}"
            self.state.metrics.requests.labels(endpoint, str(status), labels["model"],
                                               labels["version"]).inc()
            self.state.metrics.request_duration.labels(
                endpoint, labels["model"], labels["version"]).observe(
                time.perf_counter() - started)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        expected = self.state.settings.api_key
        if not expected:
            return
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())
                    if isinstance(v, str)}
        given = metadata.get("x-api-key") or None
        if given is None:
            scheme, _, token = metadata.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized()

    def _detector(self, name: str, version: str, labels: dict[str, str]) -> Detector:
        if self.state.draining:
            raise NotReady()
        detector = self.registry.resolve(name, requested_version(version))
        labels["model"], labels["version"] = detector.name, str(detector.version)
        return detector

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return await self._call("ServerLive", context,
                                lambda _: _done(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return await self._call("ServerReady", context, lambda _: _done(
            pb.ServerReadyResponse(ready=self.state.ready)))

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def work(labels: dict[str, str]) -> Any:
            if self.registry.started and not self.registry.known(request.name):
                raise NotFound(f"unknown model {request.name[:128]!r}")
            ready = not self.state.draining and self.registry.model_ready(
                request.name, requested_version(request.version))
            return pb.ModelReadyResponse(ready=ready)

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return await self._call("ServerMetadata", context, lambda _: _done(
            pb.ServerMetadataResponse(name="dfine-serve", version="0.1.0",
                                      extensions=["model_repository"])))

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def work(labels: dict[str, str]) -> Any:
            detector = self._detector(request.name, request.version, labels)
            meta = model_metadata(detector, [detector.version] if request.version
                                  else self.registry.versions_of(request.name))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]])

        return await self._call("ModelMetadata", context, work)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        async def work(labels: dict[str, str]) -> Any:
            detector = self._detector(request.model_name, request.model_version, labels)
            parsed = await asyncio.to_thread(_parsed, request, limits_for(detector))
            check_outputs(parsed.outputs)
            work_items = await asyncio.to_thread(jobs, parsed, detector)
            # The whole message has arrived (gRPC reads it before the handler): places for
            # its images now, with the same short wait for room as REST.
            await detector.acquire(len(work_items), detector.settings.admission_wait_ms / 1000)
            try:
                results = await all_or_none(job() for job in work_items)
            finally:
                detector.release(len(work_items))
            tensors = result_tensors(results, parsed.outputs, detector)
            return pb.ModelInferResponse(
                model_name=detector.name, model_version=str(detector.version),
                id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(
                    name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors],
                raw_output_contents=[t.raw() for t in tensors])

        return await self._call("ModelInfer", context, work)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        async def work(labels: dict[str, str]) -> Any:
            entry = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(models=[
                entry(name=s.name, version=str(s.version) if s.version else "",
                      state=s.state, reason=s.reason)
                for s in self.registry.index(ready_only=request.ready)])

        return await self._call("RepositoryIndex", context, work)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def work(labels: dict[str, str]) -> Any:
            if request.parameters:
                raise InvalidRequest("load parameters (a config or files in the request) are "
                                     "not supported: put the model in the repository")
            await self.registry.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", context, work)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def work(labels: dict[str, str]) -> Any:
            await self.registry.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", context, work)


async def _done(value: T) -> T:
    return value


class GrpcServer:
    """The gRPC server beside uvicorn: started in the lifespan, stopped after the drain."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        limit = message_limit(state)
        # Every RPC in flight may hold a whole message: their number is bounded (the docs'
        # "Memory"); more are refused with RESOURCE_EXHAUSTED.
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=state.settings.grpc_max_inflight)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state),
                                                           self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
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

