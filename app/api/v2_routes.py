"""The Open Inference Protocol (KServe v2 / Triton) over HTTP, beside the service's own API:
the same detector, batcher, limits, API key and metrics. Errors take the protocol's form,
``{"error": "<message>"}`` (app.api.errors). What the inputs and outputs are:
app.api.v2_inference; the model configuration: app.api.v2_config; the statistics:
app.api.v2_stats.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from app.api import v2_inference
from app.api.deps import AppState, StateDep, admitted, bind, require_api_key
from app.api.routes import until_disconnect
from app.api.uploads import MULTIPART_OVERHEAD_BYTES, read_body
from app.api.v2_codec import parse_request
from app.api.v2_config import model_config, version_policy
from app.api.v2_extensions import SERVER_NAME, SERVER_VERSION, extensions
from app.api.v2_inference import (
    check_outputs,
    jobs,
    limits_for,
    requested_version,
    rest_outputs,
    result_tensors,
)
from app.api.v2_stats import read_samples, statistics
from app.batching import all_or_none
from app.errors import InvalidRequest, NotFound
from app.service import Detector

router = APIRouter(prefix="/v2", dependencies=[Depends(require_api_key)],
                   tags=["Open Inference Protocol (KServe v2)"])


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


def _loaded(request: Request, state: AppState, name: str, version: str | None) -> Detector:
    return bind(request, state.registry.resolve(name, requested_version(version)))


@router.get("", summary="Server metadata", responses=AUTH)
async def server_metadata(state: StateDep) -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION,
                  "extensions": extensions(state.shm is not None and state.shm.enabled)})


@router.get("/health/live", summary="Server liveness (200 while the process runs)",
            response_class=Response, responses={200: EMPTY, **AUTH})
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="Server readiness (200 when ready, 400 otherwise)",
            response_class=Response, responses={200: EMPTY, **NOT_READY, **AUTH})
async def ready(state: StateDep) -> Response:
    return Response(status_code=200 if state.ready else 400)


# Before /models/{name}, as Triton matches it: a model named "stats" is not reachable here.
@router.get("/models/stats", summary="Statistics of every loaded model version",
            responses=AUTH)
async def all_statistics(state: StateDep) -> Response:
    return await _statistics(state, [(d.name, d.version) for d in state.registry.detectors()])


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
    return _json(v2_inference.model_metadata(detector, [detector.version] if version
                                else state.registry.versions_of(name)))


@router.get("/models/{name}/config", summary="Model configuration (its newest loaded version, "
            "in Triton's ModelConfig schema)", responses=MODEL_ERRORS)
async def config(name: str, request: Request, state: StateDep) -> Response:
    return await _config(request, state, name, None)


@router.get("/models/{name}/versions/{version}/config",
            summary="Model version configuration (Triton's ModelConfig)", responses=MODEL_ERRORS)
async def version_config(name: str, version: str, request: Request, state: StateDep
                         ) -> Response:
    return await _config(request, state, name, version)


async def _config(request: Request, state: AppState, name: str, version: str | None
                  ) -> Response:
    detector = _loaded(request, state, name, version)
    policy = await asyncio.to_thread(version_policy, detector.settings, detector.name)
    return _json(model_config(detector, policy))


@router.get("/models/{name}/stats", summary="Statistics of a model's loaded versions",
            responses=MODEL_ERRORS)
async def model_statistics(name: str, state: StateDep) -> Response:
    state.registry.resolve(name)  # NotFound (or NotReady) as for its metadata
    return await _statistics(state, [(name, v) for v in state.registry.versions_of(name)])


@router.get("/models/{name}/versions/{version}/stats", summary="Statistics of a model version",
            responses=MODEL_ERRORS)
async def version_statistics(name: str, version: str, state: StateDep) -> Response:
    detector = state.registry.resolve(name, requested_version(version))
    return await _statistics(state, [(detector.name, detector.version)])


async def _statistics(state: AppState, versions: list[tuple[str, int]]) -> Response:
    # Off the loop: with FRONTENDS > 1 this reads every process's metric files.
    samples = await asyncio.to_thread(read_samples, state.metrics.registry)
    return _json(statistics(samples, versions))


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
    ready = not state.draining and registry.model_ready(name, requested_version(version))
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
    detector = admitted(request, state, name, requested_version(version))
    settings = detector.settings
    header = request.headers.get("inference-header-content-length")
    if header is not None and not (header.isascii() and header.isdigit() and len(header) <= 15):
        raise InvalidRequest("Inference-Header-Content-Length must be a number of bytes")
    limit = settings.max_batch_images * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    body = await read_body(request, settings, limit)
    # Off the event loop: what is left of parsing after the bounds is still Python work.
    parsed = await asyncio.to_thread(parse_request, body,
                                     int(header) if header is not None else None,
                                     limits_for(detector), state.shm)
    del body
    check_outputs(parsed.outputs)
    work = await asyncio.to_thread(jobs, parsed, detector)
    # The admission gate held places for what the body's size suggested: take the rest now.
    extra = len(work) - request.scope.get("state", {}).get("places", len(work))
    if extra > 0:
        await detector.acquire(extra, 0)
    try:
        results = await until_disconnect(request, all_or_none(job() for job in work))
    finally:
        if extra > 0:
            detector.release(extra)
    head: dict[str, Any] = {"model_name": name, "model_version": str(detector.version),
                            **({"id": parsed.id} if parsed.id is not None else {}),
                            "outputs": []}
    head["outputs"], blobs = rest_outputs(
        result_tensors(results, parsed.outputs, detector), parsed)
    if not blobs:
        return _json(head)
    # The binary tensor extension: the JSON header, then each binary output's bytes in order.
    text = orjson.dumps(head)
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})
