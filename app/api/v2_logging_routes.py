"""The Open Inference Protocol's log settings over REST (Triton's ``/v2/logging``): reading
them takes the API key, changing them the control key (app.api.keys), as the repository's
load and unload do. What they mean: app.api.v2_logging."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import StateDep, require_api_key
from app.api.repository_routes import require_control_key
from app.api.uploads import read_body
from app.api.v2_logging import KEYS, log_control
from app.api.v2_routes import AUTH, Responses, _error, _json
from app.errors import InvalidRequest

MAX_BODY_BYTES = 4096


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
_SETTINGS: dict[str, Any] = {"type": "object", "properties": {
    "log_file": {"type": "string"}, "log_info": {"type": "boolean"},
    "log_warning": {"type": "boolean"}, "log_error": {"type": "boolean"},
    "log_verbose_level": {"type": "integer", "minimum": 0},
    "log_format": {"type": "string"}}}
_CHANGE_ERRORS: Responses = {
    401: _error("the control key is missing or wrong"),
    403: _error("the API key, which does not open control calls: use CONTROL_API_KEY"),
    413: _error("a body over 4 KiB"),
    422: _error("an unknown setting, a value of the wrong type, or a change of log_file or "
                "log_format (set at start)"),
    503: _error("FRONTENDS > 1: the engine process, which keeps the service's settings, is "
                "away")}


@router.get("/logging", summary="Log settings", responses=AUTH,
            dependencies=[Depends(require_api_key)])
async def get_log_settings(state: StateDep) -> Response:
    return _json(log_control(state.settings.log_format).current.json())


@router.post("/logging", summary="Change the log settings (the log level)",
             responses=_CHANGE_ERRORS, dependencies=[Depends(require_control_key)],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": _SETTINGS}}}})
async def update_log_settings(request: Request, state: StateDep) -> Response:
    """``log_verbose_level`` >= 1: DEBUG; else the first of ``log_info``, ``log_warning``,
    ``log_error`` that is true gives INFO, WARNING or ERROR; none of them: no log at all.
    Answers the settings after the change, once every process of the service applies it
    (FRONTENDS > 1: every front end and the engine process)."""
    data = await read_body(request, state.settings, MAX_BODY_BYTES)
    try:
        body = orjson.loads(bytes(data)) if data.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body must be a JSON object of {list(KEYS)}")
    return _json((await log_control(state.settings.log_format).change(body)).json())
