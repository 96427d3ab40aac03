"""The shared-memory extensions over REST, as tritonclient.http calls them: system shared
memory (register, unregister, status; app.api.shm), and CUDA shared memory answered as not
supported (status: none; unregister: done; register: 501). Every call needs the control key,
as the repository's load and unload do: a region names memory on the server's host. Errors
take the protocol's form, ``{"error": "<message>"}``; a register or unregister answers 200
with an empty body, as Triton does."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import AppState, StateDep
from app.api.repository_routes import require_control_key
from app.api.shm import CUDA_UNSUPPORTED, OFF, Regions
from app.api.uploads import read_json_object
from app.api.v2_routes import Responses, _error
from app.errors import InvalidRequest, NotFound, Unsupported

router = APIRouter(prefix="/v2", dependencies=[Depends(require_control_key)],
                   tags=["Open Inference Protocol (KServe v2)"])
MAX_BODY_BYTES = 64 * 1024
ERRORS: Responses = {
    401: _error("the control key is missing or wrong"),
    403: _error("the API key, which does not open control calls: use CONTROL_API_KEY")}
REGISTER_ERRORS: Responses = {
    **ERRORS,
    409: _error("the name is registered already, or MAX_SHM_REGIONS or MAX_SHM_BYTES would "
                "be passed"),
    422: _error("a key SHM_KEY_PREFIXES does not allow, a segment that cannot be opened, "
                "offset + byte_size past the segment's end, or a body without key and "
                "byte_size"),
    501: _error("system shared memory is off (SHM_KEY_PREFIXES is empty)")}
_REGISTER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["key", "byte_size"],
                                    "properties": {
        "key": {"type": "string", "description": "the segment, as shm_open names it"},
        "offset": {"type": "integer", "minimum": 0},
        "byte_size": {"type": "integer", "minimum": 1}}}}}}}
_REGION = {"type": "object", "properties": {
    "name": {"type": "string"}, "key": {"type": "string"},
    "offset": {"type": "integer"}, "byte_size": {"type": "integer"}}}
_STATUS: Responses = {200: {"description": "the regions", "content": {"application/json": {
    "schema": {"type": "array", "items": _REGION}}}}}
EMPTY: Responses = {200: {"description": "done", "content": {}}}


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _regions(state: AppState) -> Regions | None:
    return state.shm if state.shm is not None and state.shm.enabled else None


async def _object(request: Request, state: AppState) -> dict[str, Any]:
    return await read_json_object(request, state.settings, MAX_BODY_BYTES)


@router.get("/systemsharedmemory/status", summary="System shared memory: every region",
            responses={**_STATUS, **ERRORS})
async def system_status(state: StateDep) -> Response:
    return await _status(state, "")


@router.get("/systemsharedmemory/region/{name}/status",
            summary="System shared memory: one region",
            responses={**_STATUS, **ERRORS, 404: _error("no region of that name")})
async def system_region_status(name: str, state: StateDep) -> Response:
    return await _status(state, name)


async def _status(state: AppState, name: str) -> Response:
    regions = _regions(state)
    if regions is None:
        if name:
            raise NotFound(f"Unable to find system shared memory region: {name[:128]!r}")
        return _json([])
    found = await asyncio.to_thread(regions.status, name)
    return _json([r.status() for r in found])


@router.post("/systemsharedmemory/region/{name}/register",
             summary="System shared memory: register a region", response_class=Response,
             responses={**EMPTY, **REGISTER_ERRORS}, openapi_extra=_REGISTER_BODY)
async def system_register(name: str, request: Request, state: StateDep) -> Response:
    """``byte_size`` bytes from ``offset`` in the segment ``key`` (/dev/shm/<key>), which
    must be at least that long; SHM_KEY_PREFIXES must allow the key."""
    regions = _regions(state)
    if regions is None:
        raise Unsupported(OFF)
    body = await _object(request, state)
    unknown = sorted(set(body) - {"key", "offset", "byte_size"})
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown[:8]}; known: byte_size, key, offset")
    if "key" not in body or "byte_size" not in body:
        raise InvalidRequest("the register call needs 'key' and 'byte_size'")
    await asyncio.to_thread(regions.register, name, body["key"], body.get("offset", 0),
                            body["byte_size"])
    return Response(status_code=200)


@router.post("/systemsharedmemory/region/{name}/unregister",
             summary="System shared memory: unregister a region (none of that name: done)",
             response_class=Response, responses={**EMPTY, **ERRORS})
async def system_unregister(name: str, state: StateDep) -> Response:
    return await _unregister(state, name)


@router.post("/systemsharedmemory/unregister",
             summary="System shared memory: unregister every region", response_class=Response,
             responses={**EMPTY, **ERRORS})
async def system_unregister_all(state: StateDep) -> Response:
    return await _unregister(state, "")


async def _unregister(state: AppState, name: str) -> Response:
    regions = _regions(state)
    if regions is not None:
        await asyncio.to_thread(regions.unregister, name)
    return Response(status_code=200)


@router.get("/cudasharedmemory/status", summary="CUDA shared memory (not supported): none",
            responses={**ERRORS})
async def cuda_status() -> Response:
    return _json([])


@router.get("/cudasharedmemory/region/{name}/status",
            summary="CUDA shared memory (not supported): none of that name",
            responses={**ERRORS, 404: _error("no region of that name")})
async def cuda_region_status(name: str) -> Response:
    raise NotFound(f"Unable to find cuda shared memory region: {name[:128]!r}")


@router.post("/cudasharedmemory/region/{name}/register",
             summary="CUDA shared memory: not supported (501)", response_class=Response,
             responses={**ERRORS, 501: _error(CUDA_UNSUPPORTED)})
async def cuda_register(name: str) -> Response:
    raise Unsupported(CUDA_UNSUPPORTED)


@router.post("/cudasharedmemory/region/{name}/unregister", response_class=Response,
             summary="CUDA shared memory (not supported): nothing to unregister",
             responses={**EMPTY, **ERRORS})
async def cuda_unregister(name: str) -> Response:
    return Response(status_code=200)


@router.post("/cudasharedmemory/unregister", response_class=Response,
             summary="CUDA shared memory (not supported): nothing to unregister",
             responses={**EMPTY, **ERRORS})
async def cuda_unregister_all() -> Response:
    return Response(status_code=200)
