"""The Open Inference Protocol's model repository extension (Triton's): the index of models
and versions with their states, behind the API key like every read, and explicit load and
unload (MODEL_CONTROL=explicit), behind the control key (app.api.keys.authorize_control).
Errors take the protocol's form, ``{"error": "<message>"}``."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import StateDep, require_api_key
from app.api.keys import authorize_control
from app.api.uploads import read_json_object
from app.api.v2_routes import AUTH, Responses, _error
from app.errors import InvalidRequest


async def require_control_key(request: Request, state: StateDep) -> None:
    """Load and unload: the control key. OPEN_PATHS does not open them (it lists what may be
    read without a key; nothing that changes what is served is ever open to anyone while a
    key is set)."""
    authorize_control(state.settings, request.headers)


router = APIRouter(prefix="/v2/repository", tags=["Open Inference Protocol (KServe v2)"])
READ = [Depends(require_api_key)]
CONTROL = [Depends(require_control_key)]
MAX_BODY_BYTES = 64 * 1024
CHANGE_ERRORS: Responses = {
    401: _error("the control key is missing or wrong"),
    403: _error("the API key, which does not open control calls: use CONTROL_API_KEY"),
    400: _error("the model could not be loaded (what served before serves on)"),
    404: _error("no model of that name in the repository"),
    409: _error("MODEL_CONTROL is not explicit, or MAX_LOADED_MODELS versions are loaded"),
    422: _error("a name that is not a model name (1 to 128 letters, digits, _ . -), or a "
                "body that is not a JSON object"),
    503: _error("the service is stopping")}
_INDEX_BODY: dict[str, Any] = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "ready": {"type": "boolean", "description": "only the versions ready to serve"}}}}}}}
_CHANGE_BODY: dict[str, Any] = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "parameters": {"type": "object"}}}}}}}


async def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    """An optional JSON object with only the ``allowed`` keys."""
    body = await read_json_object(request, request.app.state.dfine.settings, MAX_BODY_BYTES)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; known: {sorted(allowed)}")
    return body


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.post("/index", summary="The repository's models and versions, with their states",
             responses={**AUTH, 422: _error("a body that is not a JSON object")},
             dependencies=READ, openapi_extra=_INDEX_BODY)
async def index(request: Request, state: StateDep) -> Response:
    """READY, LOADING, UNLOADING or UNAVAILABLE (with the reason: a failed load says why)."""
    body = await _body(request, {"ready"})
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidRequest("ready must be true or false")
    return _json([{"name": s.name, **({"version": str(s.version)} if s.version else {}),
                   "state": s.state, "reason": s.reason}
                  for s in state.registry.index(ready_only=ready)])


@router.post("/models/{name}/load", summary="Load a model (MODEL_CONTROL=explicit)",
             response_class=Response, responses={200: {"description": "loaded"},
                                                 **CHANGE_ERRORS},
             dependencies=CONTROL, openapi_extra=_CHANGE_BODY)
async def load(name: str, request: Request, state: StateDep) -> Response:
    """Loads, warms up and checks the versions its version policy wants beside those
    serving, then serves them; answers once they serve. Again on a loaded model: new or
    rewritten versions are rolled in, failed ones tried again."""
    body = await _body(request, {"parameters"})
    if body.get("parameters"):
        raise InvalidRequest("load parameters (a config or files in the request) are not "
                             "supported: put the model in the repository")
    await state.registry.load(name)
    return Response(status_code=200)


@router.post("/models/{name}/unload", summary="Unload a model (MODEL_CONTROL=explicit)",
             response_class=Response, responses={200: {"description": "unloading"},
                                                 **CHANGE_ERRORS},
             dependencies=CONTROL, openapi_extra=_CHANGE_BODY)
async def unload(name: str, request: Request, state: StateDep) -> Response:
    """Its requests get 404 from now on; those already admitted finish, then its memory is
    released (the index shows UNLOADING until then)."""
    body = await _body(request, {"parameters"})
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict) or set(parameters) - {"unload_dependents"}:
        raise InvalidRequest("unload parameters: only unload_dependents (no model here has "
                             "dependents)")
    await state.registry.unload(name)
    return Response(status_code=200)
