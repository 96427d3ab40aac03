"""The Open Inference Protocol (KServe v2 / Triton) over HTTP, beside the service's own API:
the same detector, batcher, limits, API key and metrics. Errors take the protocol's form,
``{"error": "<message>"}`` (app.api.errors).

Inputs: BYTES, the encoded image files (what Triton ensemble and DALI clients send), shape [N]
or [N, 1]; or FP32 ``images`` [N, 3, H, W] already preprocessed as the official pipeline does,
with INT64 ``orig_target_sizes`` [N, 2] (width, height; default: the input size). Outputs, in the
official export's layout: ``labels`` INT64 [N, K], ``boxes`` FP32 [N, K, 4] (original pixels,
unclipped), ``scores`` FP32 [N, K], and ``names`` BYTES [N, K], the labels' class names.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import AppState, StateDep, admitted, bind, require_api_key
from app.api.routes import until_disconnect
from app.api.uploads import MULTIPART_OVERHEAD_BYTES, read_body
from app.api.v2_codec import InferRequest, Limits, output, parse_request
from app.errors import InvalidRequest, NotFound
from app.imaging import MAX_SIDE as MAX_TARGET_SIDE
from app.imaging import PreparedImage
from app.labels import label_name
from app.service import Detector, Official

T = TypeVar("T")

router = APIRouter(prefix="/v2", dependencies=[Depends(require_api_key)],
                   tags=["Open Inference Protocol (KServe v2)"])
OUTPUTS = ("labels", "boxes", "scores", "names")


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}


Responses = dict[int | str, dict[str, Any]]
AUTH: Responses = {401: _error("the API key is missing or wrong")}
MODEL_ERRORS: Responses = {
    **AUTH, 404: _error("no model of that name"), 503: _error("not ready")}
INFER_ERRORS: Responses = {
    **MODEL_ERRORS,
    400: _error("an image that does not decode"),
    408: _error("the upload was too slow"),
    413: _error("the body or an image is over its limit"),
    415: _error("an image format that is not accepted"),
    422: _error("a request that does not follow the protocol"),
    500: _error("the engine failed"), 504: _error("the deadline passed before the run")}
EMPTY: dict[str, Any] = {"description": "true", "content": {}}
NOT_READY: Responses = {400: {"description": "false (the protocol's 4xx)", "content": {}}}
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "data": {"type": "array"}, "parameters": {"type": "object"}}}
INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "the binary tensor data extension"}}}}


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _version(text: str | None) -> int | None:
    """A path's version: Triton's are strings; ours positive integers (404 otherwise)."""
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and int(text) > 0):
        raise NotFound(f"unknown version {text[:32]!r}: versions are positive integers")
    return int(text)


def _loaded(request: Request, state: AppState, name: str, version: str | None) -> Detector:
    return bind(request, state.registry.resolve(name, _version(version)))


@router.get("", summary="Server metadata", responses=AUTH)
async def server_metadata() -> Response:
    return _json({"name": "dfine-serve", "version": "0.1.0",
                  "extensions": ["binary_tensor_data"]})


@router.get("/health/live", summary="Server liveness (200 while the process runs)",
            response_class=Response, responses={200: EMPTY, **AUTH})
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="Server readiness (200 when ready, 400 otherwise)",
            response_class=Response, responses={200: EMPTY, **NOT_READY, **AUTH})
async def ready(state: StateDep) -> Response:
    return Response(status_code=200 if state.ready else 400)


@router.get("/models/{name}", summary="Model metadata (its newest loaded version)",
            responses=MODEL_ERRORS)
async def model_metadata(name: str, request: Request, state: StateDep) -> Response:
    return _metadata(request, state, name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata",
            responses=MODEL_ERRORS)
async def version_metadata(name: str, version: str, request: Request, state: StateDep
                           ) -> Response:
    return _metadata(request, state, name, version)


def _metadata(request: Request, state: AppState, name: str, version: str | None) -> Response:
    detector = _loaded(request, state, name, version)
    info = detector.engine.info
    versions = state.registry.versions_of(name)
    return _json({
        "name": info.name,
        "versions": [str(v) for v in ([detector.version] if version else versions)],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "images", "datatype": "FP32",
             "shape": [-1, 3, info.input_height, info.input_width]},
            {"name": "orig_target_sizes", "datatype": "INT64", "shape": [-1, 2]},
        ],
        "outputs": [
            {"name": "labels", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "names", "datatype": "BYTES", "shape": [-1, -1]},
        ],
    })


@router.get("/models/{name}/ready", summary="Model readiness (200 when ready, 400 otherwise)",
            response_class=Response,
            responses={200: EMPTY, **NOT_READY, **AUTH, 404: MODEL_ERRORS[404]})
async def model_ready(name: str, state: StateDep) -> Response:
    """400 while it loads or after it is unloaded; 404 for a model the repository lacks."""
    return _ready(state, name, None)


@router.get("/models/{name}/versions/{version}/ready", response_class=Response,
            summary="Model version readiness (200 when ready, 400 otherwise)",
            responses={200: EMPTY, **NOT_READY, **AUTH, 404: MODEL_ERRORS[404]})
async def version_ready(name: str, version: str, state: StateDep) -> Response:
    return _ready(state, name, version)


def _ready(state: AppState, name: str, version: str | None) -> Response:
    registry = state.registry
    if registry.started and not registry.known(name):
        raise NotFound(f"unknown model {name[:128]!r}")
    ready = not state.draining and registry.model_ready(name, _version(version))
    return Response(status_code=200 if ready else 400)


@router.post("/models/{name}/infer", summary="Inference (the newest loaded version)",
             responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, state: StateDep) -> Response:
    return await _infer(request, state, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference (one version)",
             responses=INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer_version(name: str, version: str, request: Request, state: StateDep
                        ) -> Response:
    return await _infer(request, state, name, version)


async def _infer(request: Request, state: AppState, name: str, version: str | None
                 ) -> Response:
    # Run by the version the admission gate routed it to: that of the path.
    detector = admitted(request, state, name, _version(version))
    settings = detector.settings
    header = request.headers.get("inference-header-content-length")
    if header is not None and not (header.isascii() and header.isdigit() and len(header) <= 15):
        raise InvalidRequest("Inference-Header-Content-Length must be a number of bytes")
    limit = settings.max_batch_images * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    body = await read_body(request, settings, limit)
    info = detector.engine.info
    images = settings.max_batch_images
    limits = Limits(images, settings.max_upload_bytes,
                    images * (3 * info.input_width * info.input_height + 2))
    # Off the event loop: what is left of parsing after the bounds is still Python work.
    parsed = await asyncio.to_thread(parse_request, body,
                                     int(header) if header is not None else None, limits)
    del body
    _check_outputs(parsed.outputs)
    work = await asyncio.to_thread(_work, parsed, detector)
    # The admission gate held places for what the body's size suggested: take the rest now.
    extra = len(work) - request.scope.get("state", {}).get("places", len(work))
    if extra > 0:
        await detector.acquire(extra, 0)
    try:
        results = await until_disconnect(request, all_or_none(job() for job in work))
    finally:
        if extra > 0:
            detector.release(extra)
    return _json({"model_name": name, "model_version": str(detector.version),
                  **({"id": parsed.id} if parsed.id is not None else {}),
                  "outputs": _outputs(results, parsed.outputs, detector)})


async def all_or_none(jobs: Iterable[Awaitable[T]]) -> list[T]:
    """Every job's result; when one fails, the others are cancelled (a decode not started yet
    never starts) and waited for, so that their places are held until they are gone, and the
    first failure is raised."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _check_outputs(wanted: list[str] | None) -> None:
    unknown = set(wanted or ()) - set(OUTPUTS)
    if unknown:
        raise InvalidRequest(f"unknown output(s) {sorted(unknown)}; outputs: {list(OUTPUTS)}")


def _work(parsed: InferRequest, detector: Detector
          ) -> list[Callable[[], Coroutine[Any, Any, Official]]]:
    """One engine submission per image (started later), from encoded files or from
    preprocessed tensors."""
    limit = detector.settings.max_batch_images
    files = [t for t in parsed.inputs.values() if t.datatype == "BYTES"]
    if files:
        images = files[0].value
        assert isinstance(images, list)
        if not 0 < len(images) <= limit:
            raise InvalidRequest(f"send 1 to {limit} images; got {len(images)}")
        return [functools.partial(detector.infer, data=data) for data in images]
    tensor = parsed.inputs.get("images")
    info = detector.engine.info
    if tensor is None or tensor.datatype != "FP32":
        raise InvalidRequest("send the images as a BYTES input, or as FP32 'images'")
    pixels = np.asarray(tensor.value, np.float32)
    if pixels.ndim != 4 or pixels.shape[1:] != (3, info.input_height, info.input_width):
        raise InvalidRequest(f"images must be [N, 3, {info.input_height}, {info.input_width}]")
    if not 0 < len(pixels) <= limit:
        raise InvalidRequest(f"send 1 to {limit} images; got {len(pixels)}")
    if not np.isfinite(pixels).all():
        raise InvalidRequest("images must be finite numbers (no NaN or infinity)")
    sizes = parsed.inputs.get("orig_target_sizes")
    if sizes is None:
        wh = np.tile([info.input_width, info.input_height], (len(pixels), 1))
    else:
        wh = np.asarray(sizes.value, np.int64)
        if (wh.shape != (len(pixels), 2) or (wh <= 0).any()
                or (wh > MAX_TARGET_SIDE).any()):
            raise InvalidRequest(f"orig_target_sizes must be [N, 2] (width, height), each "
                                 f"1 to {MAX_TARGET_SIDE}")
    return [functools.partial(detector.infer, prepared=PreparedImage(
        np.ascontiguousarray(p), int(w), int(h), (int(w), int(h))))
        for p, (w, h) in zip(pixels, wh)]


def _outputs(results: list[Official], wanted: list[str] | None, detector: Detector
             ) -> list[dict[str, Any]]:
    labels = np.stack([r.labels for r in results])
    names = detector.engine.info.labels
    made = {
        "labels": lambda: output("labels", labels.astype(np.int64), "INT64"),
        "boxes": lambda: output("boxes", np.stack([r.boxes for r in results]).astype(
            np.float32), "FP32"),
        "scores": lambda: output("scores", np.stack([r.scores for r in results]).astype(
            np.float32), "FP32"),
        "names": lambda: output("names", [[label_name(names, int(v)) for v in row]
                                          for row in labels], "BYTES"),
    }
    return [made[name]() for name in (wanted or OUTPUTS)]
