"""The composition root: ``create_app(settings)`` wires everything; nothing runs at import."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.api.admission import DETECT_PATHS, AdmissionGate
from app.api.deps import AppState
from app.api.errors import install_error_handlers
from app.api.head import HeadAsGet
from app.api.observe import RequestObserver
from app.api.routes import STATIC, pages, router
from app.api.security import SecurityHeaders
from app.api.v2_routes import router as v2_router
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.engine.instant import load_engine
from app.metrics import Metrics
from app.service import Detector

log = logging.getLogger("dfine")


async def _load(state: AppState, engine: OnnxEngine | None) -> None:
    """Load (unless given), warm up every batch size, then turn ready."""
    settings = state.settings
    try:
        if engine is None:
            engine = await asyncio.to_thread(load_engine, settings)
        detector = Detector(engine, settings, state.metrics)
        started = time.perf_counter()
        await asyncio.to_thread(detector.warm_up)
        buckets = engine.buckets
        log.info("warmed up %s in %.1f s; requests can hold at most %.0f MB "
                 "(MAX_QUEUE, MAX_UPLOAD_BYTES, MAX_PIXELS)",
                 f"buckets {','.join(map(str, buckets))}" if buckets
                 else f"batch sizes 1..{detector.max_batch_size}",
                 time.perf_counter() - started, detector.memory_bound_bytes / 1e6)
        info = engine.info
        state.metrics.model_info.info({
            "model": info.name, "format": "onnx", "layout": info.layout,
            "providers": ",".join(info.providers),
            "input_size": f"{info.input_width}x{info.input_height}"})
        state.metrics.queue_capacity.set(settings.max_queue)
        # What startup built (modules, the app, the model's session) lives as long as the
        # process: frozen, it is no longer scanned by every full garbage collection, which
        # would otherwise stall the event loop for milliseconds at a time.
        gc.collect()
        gc.freeze()
        detector.start()
        state.detector = detector
    except Exception as exc:
        state.failure = str(exc)
        log.error("cannot serve the model: %s", exc)


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
        # Served by app.api.routes instead: from local files (no CDN), and behind the API key
        # unless OPEN_PATHS lists them. No ReDoc: one API page is enough.
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.dfine = state
    install_error_handlers(app, metrics)
    app.include_router(router)
    app.include_router(v2_router)
    app.include_router(pages)
    app.mount("/static/swagger", StaticFiles(directory=STATIC / "swagger"), name="swagger")

    app.add_middleware(AdmissionGate, state=state)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(HeadAsGet)
    app.add_middleware(SecurityHeaders, page=STATIC / "index.html")
    # Outermost: it sees every answer, the gate's refusals included.
    app.add_middleware(RequestObserver, metrics=metrics, known_paths=DETECT_PATHS)
    return app
