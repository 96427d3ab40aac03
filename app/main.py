"""The composition root: ``create_app(settings)`` wires everything; nothing runs at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.admission import DETECT_PATHS, AdmissionGate
from app.api.deps import AppState
from app.api.errors import install_error_handlers
from app.api.routes import protected, router
from app.config import Settings
from app.engine.session import OnnxEngine
from app.metrics import Metrics
from app.service import Detector

log = logging.getLogger("dfine")


async def _load(state: AppState, engine: OnnxEngine | None) -> None:
    """Load (unless given), warm up every batch size, then turn ready."""
    settings = state.settings
    try:
        if engine is None:
            engine = await asyncio.to_thread(OnnxEngine.load, settings)
        detector = Detector(engine, settings, state.metrics)
        started = time.perf_counter()
        await asyncio.to_thread(detector.warm_up)
        log.info("warmed up batch sizes 1..%d in %.1f s; requests can hold at most %.0f MB "
                 "(MAX_QUEUE, MAX_UPLOAD_BYTES, MAX_PIXELS)", detector.max_batch_size,
                 time.perf_counter() - started, detector.memory_bound_bytes / 1e6)
        info = engine.info
        state.metrics.model_info.info({
            "model": info.name, "format": "onnx", "layout": info.layout,
            "providers": ",".join(info.providers),
            "input_size": f"{info.input_width}x{info.input_height}"})
        state.metrics.queue_capacity.set(settings.max_queue)
        detector.start()
        state.detector = detector
    except Exception as exc:
        state.failure = str(exc)
        log.error("cannot serve the model: %s", exc)


def _endpoint(scope: Scope) -> str:
    """The route's path template (bounded label values), or 'other' for unknown paths."""
    path = getattr(scope.get("route"), "path", None)
    if path is None and scope.get("path") in DETECT_PATHS:  # refused by the gate: no route
        path = scope["path"]
    return str(path) if path else "other"


def create_app(settings: Settings, engine: OnnxEngine | None = None) -> FastAPI:
    """An app serving ``settings.model_path`` (or an already loaded ``engine``).

    The model loads and warms up in the background after startup: /healthz answers at once,
    /readyz turns 200 when the model is ready.
    """
    metrics = Metrics()
    state = AppState(settings=settings, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state, engine))
        yield
        state.draining = True
        loading.cancel()
        if state.detector is not None:
            await state.detector.drain(settings.request_timeout_s)
            await state.detector.stop()

    app = FastAPI(
        title="dfine-serve",
        version="0.1.0",
        description="Object detection with D-FINE (and RT-DETR, RT-DETRv2, DEIM) ONNX models, "
                    "with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.dfine = state
    install_error_handlers(app, metrics)
    app.include_router(router)
    app.include_router(protected)

    app.add_middleware(AdmissionGate, state=state)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees refusals too
    return app


class RequestMetrics:
    """Counts requests by route template and status, and times them (plain ASGI, so request
    bodies and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            endpoint = _endpoint(scope)
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.request_duration.labels(endpoint=endpoint).observe(
                time.perf_counter() - started)
