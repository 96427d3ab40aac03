"""The Open Inference Protocol's trace extension (Triton's): the trace settings, global and
per model, read with the API key and changed with the control key (as the repository's load
and unload), over REST (``/v2/trace/setting``, ``/v2/models/{name}/trace/setting``) and gRPC
(``TraceSetting``: ``grpc_trace_setting``); and gRPC ModelInfer's root span
(``begin_grpc_trace``). What the settings do: app.tracing.

Values go out as Triton sends them: strings, and ``trace_level`` a list of strings. An update
may send numbers as well as strings, and a bare string for ``trace_level``; ``null`` (gRPC: no
value) clears a setting (a model's falls back to the global one)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response

from app.api.deps import AppState, StateDep, require_api_key
from app.api.repository_routes import require_control_key
from app.api.uploads import read_json_object
from app.api.v2_routes import AUTH, Responses, _error
from app.errors import InvalidRequest
from app.tracing import InvalidSetting, RequestTrace, Tracing

if TYPE_CHECKING:
    from app.routing import Routing

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
READ = [Depends(require_api_key)]
CONTROL = [Depends(require_control_key)]
MAX_BODY_BYTES = 16 * 1024
_SETTINGS = {"type": "object", "properties": {
    "trace_level": {"type": "array", "items": {"type": "string", "enum": ["OFF", "TIMESTAMPS"]}},
    "trace_rate": {"type": "string"}, "trace_count": {"type": "string"},
    "log_frequency": {"type": "string"}, "trace_mode": {"type": "string"},
    "url": {"type": "string"}}}
_ANSWER: Responses = {200: {"description": "the settings in force", "content": {
    "application/json": {"schema": _SETTINGS}}}}
READ_ERRORS: Responses = {**_ANSWER, **AUTH, 404: _error("no model of that name"),
                          503: _error("the model is loading, or the service is stopping")}
UPDATE_ERRORS: Responses = {
    **READ_ERRORS,
    422: _error("a value that does not parse, or a setting that does not exist"),
    408: _error("the body was too slow to arrive"), 413: _error("a body over 16 KiB"),
    403: _error("the API key, which does not change settings: use CONTROL_API_KEY"),
    501: _error("trace_file, url, or the TENSORS level: not supported")}
_UPDATE_BODY: dict[str, Any] = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": _SETTINGS}}}}


def _flat(report: Mapping[str, list[str]]) -> dict[str, Any]:
    """REST's form: each value one string, ``trace_level`` a list."""
    return {k: (v if k == "trace_level" else (v[0] if v else "")) for k, v in report.items()}


def _values(key: str, value: Any) -> list[str] | None:
    """A REST value as the strings gRPC would carry (None: clear)."""
    if value is None:
        return None
    if isinstance(value, list) and key == "trace_level":
        if not all(isinstance(v, str) for v in value):
            raise InvalidSetting("trace_level must be a list of strings, e.g. [\"TIMESTAMPS\"]")
        return value or None
    if isinstance(value, str):
        return [value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    raise InvalidSetting(f"{key[:64]} must be a string")


async def _update(request: Request) -> dict[str, list[str] | None]:
    try:
        body = await read_json_object(request, request.app.state.dfine.settings,
                                      MAX_BODY_BYTES)
    except InvalidSetting:
        raise
    except InvalidRequest:
        raise InvalidSetting("the body must be a JSON object of trace settings") from None
    return {str(k): _values(str(k), v) for k, v in body.items()}


def _model(registry: Routing, name: str) -> str:
    """A model's name, once it is known to be served (NotFound, NotReady otherwise)."""
    return registry.resolve(name).name


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/trace/setting", summary="The global trace settings", responses=READ_ERRORS,
            dependencies=READ)
async def get_global(state: StateDep) -> Response:
    return _json(_flat(state.tracing.report()))


@router.post("/trace/setting", summary="Change the global trace settings",
             responses=UPDATE_ERRORS, dependencies=CONTROL, openapi_extra=_UPDATE_BODY)
async def update_global(request: Request, state: StateDep) -> Response:
    """The settings after the update: level OFF or TIMESTAMPS, rate (one request in this many
    is traced), count (traces left, -1: no limit). Answered once every front end follows
    the update (FRONTENDS > 1; each counts its own requests and traces)."""
    await state.tracing.change(None, await _update(request))
    return _json(_flat(state.tracing.report()))


@router.get("/models/{name}/trace/setting", summary="A model's trace settings",
            responses=READ_ERRORS, dependencies=READ)
async def get_model(name: str, state: StateDep) -> Response:
    return _json(_flat(state.tracing.report(_model(state.registry, name))))


@router.post("/models/{name}/trace/setting", summary="Change a model's trace settings",
             responses=UPDATE_ERRORS, dependencies=CONTROL, openapi_extra=_UPDATE_BODY)
async def update_model(name: str, request: Request, state: StateDep) -> Response:
    """The values given are the model's own; the others follow the global settings."""
    model = _model(state.registry, name)
    await state.tracing.change(model, await _update(request))
    return _json(_flat(state.tracing.report(model)))


async def grpc_trace_setting(state: AppState, request: Any) -> Any:
    """gRPC ``TraceSetting``: an update when ``request.settings`` is not empty (the caller
    must hold the control key), a read otherwise; the settings in force, as a
    ``TraceSettingResponse``. For ``request.model_name`` when it is not empty."""
    from tritonclient.grpc import service_pb2 as pb

    model = _model(state.registry, request.model_name) if request.model_name else None
    if request.settings:
        await state.tracing.change(model, {k: list(v.value) or None
                                           for k, v in request.settings.items()})
    value = pb.TraceSettingResponse.SettingValue
    return pb.TraceSettingResponse(settings={
        k: value(value=v) for k, v in state.tracing.report(model).items()})


def begin_grpc_trace(tracing: Tracing, method: str, message: bytes,
                     headers: Mapping[str, str], started: float, context: Any
                     ) -> RequestTrace | None:
    """A sampled gRPC inference's root span (the caller's ``traceparent`` metadata
    continued), its ``traceparent`` set in the call's trailing metadata; None if not sampled.
    Called only while ``tracing.active``."""
    from app.api.grpc_wire import request_target
    from app.errors import ServiceError

    try:
        model: str | None = request_target(message)[0] or None
    except ServiceError:  # ModelInfer says what is wrong with the message
        model = None
    trace = tracing.begin(f"grpc {method}", model, headers, started, {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": method})
    if trace is not None:
        context.set_trailing_metadata((("traceparent", trace.traceparent),))
    return trace


def trace_ended(trace: RequestTrace, status: int, labels: Mapping[str, str]) -> None:
    """End a gRPC call's root span: ``status`` as the service's metrics count gRPC calls
    (HTTP's numbers: 200, 400, 503...), in ``dfine.status``."""
    trace.finish(status, (("dfine.model", labels.get("model")),
                          ("dfine.version", labels.get("version"))),
                 status_attribute="dfine.status")
