"""Routes: validate, hand over to the detector, shape the response. Nothing heavier."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.deps import DetectorDep, ModelDep, ParamsDep, StateDep, require_api_key
from app.api.errors import AUTH_ERRORS, DETECT_ERRORS, MODEL_LOOKUP, NOT_READY
from app.api.uploads import read_image, read_images
from app.errors import ClientClosed, ServiceError
from app.http_protocol import ON_DISCONNECT
from app.postprocess import detection_json
from app.render import negotiate
from app.schemas import (
    BatchingInfo,
    BatchResponse,
    DetectResponse,
    EngineInfo,
    ImageSize,
    LoadedModel,
    ModelResponse,
    Status,
)
from app.service import Detector, DetectResult

T = TypeVar("T")

# Every route checks the API key (when one is set); OPEN_PATHS (default /healthz, /readyz,
# /metrics) are exempt.
router = APIRouter(dependencies=[Depends(require_api_key)])
pages = APIRouter()  # the web page is public; it asks for the key when the API needs one

STATIC = Path(__file__).resolve().parent.parent / "static"
RENDER_CHUNK_BYTES = 256 * 1024


@pages.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web page: drop or paste an image, see the boxes (app/static, no build step)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@pages.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    """Swagger UI, from this service's own files (app/static/swagger)."""
    return FileResponse(STATIC / "docs.html", media_type="text/html")

_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["image"], "properties": {"image": _BINARY}}},
    "image/*": {"schema": _BINARY},
    "application/octet-stream": {"schema": _BINARY},
    "application/json": {"schema": {
        "type": "object", "required": ["image"], "properties": {"image": {
            "type": "string", "contentEncoding": "base64",
            "description": "the image file in base64 (a data: URL is accepted too)"}}}},
}}}
BATCH_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {"type": "array", "items": _BINARY, "minItems": 1}}}},
}}}


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first: a request whose client has
    gone is dropped from the queue before it runs.

    The service's HTTP protocol (app.http_protocol) calls back on a disconnect; elsewhere one
    watcher task reads ``receive`` and cancels this one. Racing ``work`` in a task of its own
    would cost a second task and an ``asyncio.wait`` on every request.
    """
    this = asyncio.current_task()
    assert this is not None
    gone = False

    def cancel() -> None:
        nonlocal gone
        gone = True
        this.cancel()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel()

    stop_watching: Callable[[], object]
    on_disconnect = request.scope.get("extensions", {}).get(ON_DISCONNECT)
    if on_disconnect is not None:
        on_disconnect(cancel)
        stop_watching = partial(on_disconnect, None)
    else:
        stop_watching = asyncio.get_running_loop().create_task(watch()).cancel
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # cancelled from elsewhere (shutdown): not ours to absorb
            raise
        this.uncancel()
        raise ClientClosed() from None
    finally:
        stop_watching()


def _result_body(detector: Detector, result: DetectResult) -> dict[str, Any]:
    """The DetectResponse schema's JSON, built directly: pydantic validation of our own output
    is measurable per request, and the schema still documents it in OpenAPI."""
    body = {
        "model": detector.name,
        "version": detector.version,
        "image": {"width": result.width, "height": result.height},
        "detections": [detection_json(d) for d in result.detections],
        "timing_ms": result.timing_ms,
    }
    if result.tiling is not None:
        body["tiling"] = result.tiling.json()
    return body


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def result_json(detector: Detector, result: DetectResult) -> bytes:
    """/detect's answer, serialized."""
    return orjson.dumps(_result_body(detector, result))


@router.post("/detect", response_model=DetectResponse, responses=DETECT_ERRORS,
                openapi_extra=IMAGE_BODY, summary="Detect objects in one image")
async def detect(request: Request, detector: DetectorDep, params: ParamsDep) -> Response:
    """One image as multipart part `image`, as the raw body (`image/*`,
    `application/octet-stream`), or as JSON `{"image": "<base64>"}` for clients that can't
    send multipart. Boxes are in the original image's pixels."""
    # Admitted by the AdmissionGate. No local keeps the upload: once decoded, only its small
    # tensor waits in the queue.
    upload = read_image(request, detector.settings)
    result = await until_disconnect(request, detector.detect(await upload, params))
    request.state.batch_size = result.batch_size  # for the access log
    return Response(result_json(detector, result), media_type="application/json")


@router.post("/detect/batch", response_model=BatchResponse, responses=DETECT_ERRORS,
                openapi_extra=BATCH_BODY, summary="Detect objects in several images")
async def detect_batch(request: Request, detector: DetectorDep, params: ParamsDep
                       ) -> Response:
    """Several multipart parts `images`; one result per image, in the order sent. An image that
    fails (not decodable, too large, its run failed) gets its own `error` in its place; the
    others are answered."""
    images = await read_images(request, detector.settings)

    async def one(data: bytes) -> DetectResult | ServiceError:
        try:
            return await detector.detect(data, params)
        except ServiceError as exc:
            return exc

    async def in_turn() -> list[DetectResult | ServiceError]:
        return [await one(data) for data in images]

    # Tiled, one image at a time: each takes its tiles' places while it runs (all of them at
    # once could need more than the model admits), and its tiles fill the batches.
    results = await until_disconnect(request, asyncio.gather(*(one(d) for d in images))
                                     if params.tiling is None else in_turn())
    body = []
    for index, result in enumerate(results):
        if isinstance(result, ServiceError):
            detector.metrics.root.errors.labels(code=result.code).inc()
            body.append({"index": index, "error": {"code": result.code,
                                                   "message": result.message}})
        else:
            body.append(_result_body(detector, result))
    return _json({"model": detector.name, "version": detector.version, "results": body})


@router.post("/detect/render", response_class=Response, openapi_extra=IMAGE_BODY,
             summary="Detect, and return the image with the boxes drawn",
             responses={200: {"content": {"image/jpeg": {"schema": _BINARY},
                                          "image/png": {"schema": _BINARY}},
                              "description": "the image with boxes and labels drawn"},
                         **DETECT_ERRORS})
async def detect_render(request: Request, detector: DetectorDep, params: ParamsDep,
                        format: Annotated[Literal["jpeg", "png"] | None, Query(
                            description="jpeg or png; default: from Accept, else jpeg")] = None,
                        ) -> Response:
    """Same input and query as `/detect`; answers a JPEG or PNG with the detections drawn."""
    data = await read_image(request, detector.settings)
    result = await until_disconnect(request, detector.detect(data, params))
    request.state.batch_size = result.batch_size
    fmt = negotiate(format, request.headers.get("accept", ""))
    detector.start_render()  # MAX_RENDERS: held until the image is sent or its client dropped
    try:
        image = await detector.render(data, result, fmt, params.orientation)
    except BaseException:
        detector.end_render()
        raise
    return _SentInPieces(image, detector.end_render, media_type=f"image/{fmt}",
                         headers={"X-Detections": str(len(result.detections))})


class _SentInPieces(StreamingResponse):
    """A large body sent in pieces, so that uvicorn's flow control keeps the unsent rest here
    while a client reads slowly, and ``done`` called once it is sent or abandoned.

    A slow client can't keep ``done`` (a render's place) waiting for long: app/http_protocol.py
    drops its connection when it reads nothing for WRITE_TIMEOUT_S, or has not read it all
    within WRITE_TIMEOUT_S + its size at MIN_SEND_RATE; the pending send then returns, the
    disconnect ends the stream, and ``done`` runs."""

    def __init__(self, body: bytes, done: Callable[[], None], media_type: str,
                 headers: dict[str, str]) -> None:
        async def pieces() -> AsyncIterator[bytes]:
            view = memoryview(body)
            for start in range(0, len(view), RENDER_CHUNK_BYTES):
                yield bytes(view[start:start + RENDER_CHUNK_BYTES])

        super().__init__(pieces(), media_type=media_type,
                         headers={**headers, "Content-Length": str(len(body))})
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._done()


@router.get("/healthz", response_model=Status, responses=AUTH_ERRORS, summary="Liveness")
async def healthz() -> Status:
    """200 while the process runs."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={**NOT_READY, **AUTH_ERRORS},
            summary="Readiness")
async def readyz(state: StateDep) -> Response:
    """200 once the model is loaded and warmed up; 503 before, while draining, and while an
    engine run is stuck past ENGINE_TIMEOUT_S."""
    if state.ready:
        return JSONResponse({"status": "ready"})
    if state.draining:
        status = "draining"
    elif state.engine_hung:
        status = "engine_hung"
    else:
        status = "failed" if state.failure else "loading"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "exposition"},
                       **AUTH_ERRORS})
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/model", response_model=ModelResponse, responses={**MODEL_LOOKUP, **AUTH_ERRORS},
            summary="The models being served")
async def model(detector: ModelDep, state: StateDep) -> ModelResponse:
    """One model version in full (default: the default model's newest; `model`, `version`
    pick another), and every version loaded in `models`."""
    return _describe(detector, state.registry.detectors(), state.registry.default_or_none())


def _describe(detector: Detector, loaded: list[Detector], default: str | None
              ) -> ModelResponse:
    info, settings = detector.engine.info, detector.settings
    return ModelResponse(
        name=info.name, version=detector.version, path=info.path.name, format="onnx",
        layout=info.layout, providers=info.providers,
        input_size=ImageSize(width=info.input_width, height=info.input_height),
        fixed_batch=info.fixed_batch, resize=info.resize, classes=info.labels,
        batching=BatchingInfo(
            max_batch_size=detector.max_batch_size, max_delay_ms=settings.max_delay_ms,
            max_queue=settings.max_queue, instances=detector.engine.parallel.instances,
            request_timeout_s=settings.request_timeout_s),
        engine=EngineInfo.model_validate(detector.engine.report()),
        models=[LoadedModel(
            name=d.name, version=d.version, default=d.name == default,
            input_size=ImageSize(width=d.engine.info.input_width,
                                 height=d.engine.info.input_height),
            classes=d.engine.info.labels, providers=d.engine.info.providers)
            for d in loaded],
    )
