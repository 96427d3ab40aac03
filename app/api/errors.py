"""Every error becomes ``{"error": {"code", "message"}}``, mapped in this one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import Overloaded, ServiceError, Unauthorized
from app.metrics import Metrics
from app.schemas import ErrorResponse

log = logging.getLogger("dfine.api")

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_response(status: int, code: str, message: str, metrics: Metrics,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """The error body: ``{"error": {"code", "message"}}``, or on the Open Inference Protocol's
    routes (/v2) its own form, ``{"error": "<message>"}``."""
    metrics.errors.labels(code=code).inc()
    body: dict[str, Any] = ({"error": message} if is_v2(path)
                            else {"error": {"code": code, "message": message}})
    return JSONResponse(body, status_code=status, headers=headers)


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", ""))
    return "; ".join(parts) or "the request is invalid"


def service_error_response(exc: ServiceError, metrics: Metrics, path: str) -> JSONResponse:
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unauthorized):  # RFC 9110: a 401 says which scheme it wants
        headers["WWW-Authenticate"] = 'Bearer realm="dfine-serve"'
    return error_response(exc.status, exc.code, exc.message, metrics, headers or None, path)


def unexpected_error_response(exc: Exception, metrics: Metrics, path: str) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)  # the details go to the log only
    return error_response(500, "internal", "internal error", metrics, path=path)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return service_error_response(exc, metrics, request.url.path)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_request", _validation_message(exc), metrics,
                              path=request.url.path)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, message, metrics, headers,
                              request.url.path)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_error_response(exc, metrics, request.url.path)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# The OpenAPI description of the errors each route can answer.
DETECT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("invalid_image: the bytes do not decode as an image"),
    401: _error("unauthorized: API key configured and missing or wrong"),
    404: _error("not_found: the model or version asked for is not loaded"),
    408: _error("request_timeout: the upload stalled for longer than READ_TIMEOUT_S"),
    413: _error("payload_too_large (upload over the byte limit) or image_too_large "
                "(decoded pixels over the limit)"),
    415: _error("unsupported_media_type: neither multipart, an image body nor JSON; or an "
                "image format that is not accepted"),
    422: _error("invalid_request: missing part, bad query values, several models served and "
                "none named"),
    500: _error("internal: the engine failed; the service stays up"),
    503: _error("overloaded (queue full, with Retry-After) or not_ready (loading, draining)"),
    504: _error("timeout: the request's deadline passed before its batch ran"),
}
NOT_READY: dict[int | str, dict[str, Any]] = {503: _error("not_ready")}
MODEL_LOOKUP: dict[int | str, dict[str, Any]] = {
    **NOT_READY, 404: _error("not_found: that model or version is not loaded"),
    422: _error("invalid_request: several models and none named, or a bad version")}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: DETECT_ERRORS[401]}
