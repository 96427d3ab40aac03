"""The composition root: ``create_app(settings)`` wires everything; nothing runs at import."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.api.admission import DETECT_PATHS, AdmissionGate
from app.api.deps import AppState
from app.api.errors import install_error_handlers
from app.api.fast_detect import DetectFastPath
from app.api.forward import ForwardStreams
from app.api.head import HeadAsGet
from app.api.observe import RequestObserver
from app.api.repository_routes import router as repository_router
from app.api.routes import STATIC, pages, router
from app.api.security import SecurityHeaders
from app.api.shm import Regions
from app.api.shm_routes import router as shm_router
from app.api.stream_routes import router as stream_router
from app.api.stream_routes import socket_router as stream_socket_router
from app.api.stream_routes import stream_params
from app.api.trace_routes import router as trace_router
from app.api.v2_logging_routes import router as v2_logging_router
from app.api.v2_routes import router as v2_router
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import ModelLoadError
from app.metrics import Metrics
from app.registry import ModelRegistry
from app.routing import Routing
from app.streams.manager import StreamManager
from app.tracing import Tracing

if TYPE_CHECKING:
    from app.api.grpc_service import GrpcServer

log = logging.getLogger("dfine")


async def _load(state: AppState, engine: OnnxEngine | None) -> None:
    """Load (or take ``engine``), warm up every batch size, check, then turn ready; with
    MODEL_CONTROL=poll, go on watching the repository."""
    started = time.perf_counter()
    await state.registry.start(engine)
    log.info("started in %.1f s: %s", time.perf_counter() - started, ", ".join(
        f"{d.name} version {d.version}" for d in state.registry.detectors()) or "no model")
    # What startup built (modules, the app, the first models' sessions) lives long: frozen,
    # it is no longer scanned by every full garbage collection, which would otherwise stall
    # the event loop for milliseconds at a time. (A version unloaded later is still freed:
    # its engine gives its sessions back explicitly.)
    gc.collect()
    gc.freeze()
    if state.settings.model_control == "poll":
        await state.registry.poll_forever()


def _grpc_server(state: AppState) -> GrpcServer:
    # Imported only when gRPC is on: a process that serves HTTP alone (GRPC_PORT=0, the
    # bench's services, the GPU check's kit) needs neither grpcio nor tritonclient.
    try:
        from app.api.grpc_service import GrpcServer
    except ImportError as exc:
        raise ModelLoadError(f"GRPC_PORT is set but gRPC cannot start ({exc}): install the "
                             f"service's dependencies, or set GRPC_PORT=0") from exc
    return GrpcServer(state)


def create_app(settings: Settings, engine: OnnxEngine | None = None,
               registry: Callable[[Metrics], Routing] | None = None,
               forward_streams_to: Path | None = None) -> FastAPI:
    """An app serving the model repository (MODEL_REPOSITORY), ``settings.model_path``, or
    an already loaded ``engine``; or, in a front end (FRONTENDS > 1), the engine process's
    models through ``registry`` (app.frontend.RemoteRegistry).

    The models load and warm up in the background after startup: /healthz answers at once,
    /readyz turns 200 when every model is ready. ``forward_streams_to``: front ends 1..N-1
    hand /streams to front end 0's socket, which runs the streams (app.api.forward).
    """
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics,
                     registry=registry(metrics) if registry is not None
                     else ModelRegistry(settings, metrics),
                     shm=Regions.for_service(settings))

    state.tracing = Tracing.from_settings(settings, state.registry.default_or_none)
    streams = state.streams = StreamManager(settings, state.registry, metrics.streams,
                                            stream_params)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = _grpc_server(state) if settings.grpc_port else None
        if grpc_server is not None:
            await grpc_server.start()
            app.state.grpc_port = grpc_server.port
        loading = asyncio.create_task(_load(state, engine))
        if forward_streams_to is None:
            await streams.start()
        yield
        state.draining = True
        await streams.stop()
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await state.registry.drain(settings.request_timeout_s)
        if grpc_server is not None:
            await grpc_server.stop(grace_s=5)
        await state.registry.stop()
        await asyncio.to_thread(state.tracing.shutdown)  # the spans still buffered, exported
        if state.shm is not None:
            state.shm.close()

    app = FastAPI(
        title="dfine-serve",
        version="0.1.0",
        description="Object detection with D-FINE (and RT-DETR, RT-DETRv2, DEIM) ONNX models, "
                    "with dynamic batching.",
        lifespan=lifespan,
        # Served by app.api.routes instead: from local files (no CDN), and behind the API key
        # unless OPEN_PATHS lists them. No ReDoc: one API page is enough.
        docs_url=None, redoc_url=None, openapi_url=None,
        # FastAPI's own OpenTelemetry off: the service traces detections itself (app.tracing),
        # and FastAPI's looks up three global providers on every request to know it is off.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.dfine = state
    install_error_handlers(app, metrics)
    app.include_router(router)
    app.include_router(v2_router)
    app.include_router(repository_router)
    app.include_router(trace_router)
    app.include_router(shm_router)
    app.include_router(v2_logging_router)
    app.include_router(stream_router)
    app.include_router(stream_socket_router)
    app.include_router(pages)
    app.mount("/static/swagger", StaticFiles(directory=STATIC / "swagger"), name="swagger")

    app.add_middleware(DetectFastPath, state=state)  # innermost: inside the gate
    app.add_middleware(AdmissionGate, state=state)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(HeadAsGet)
    app.add_middleware(SecurityHeaders, page=STATIC / "index.html")
    # Outermost: it sees every answer, the gate's refusals included.
    app.add_middleware(RequestObserver, metrics=metrics, known_paths=DETECT_PATHS,
                       tracing=state.tracing)
    if forward_streams_to is not None:  # outermost: front end 0 observes them, once
        app.add_middleware(ForwardStreams, socket_path=forward_streams_to)
    return app
