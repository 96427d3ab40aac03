"""POST /detect without FastAPI's routing and dependency injection: the hot path.

On a GPU the front end is the bound, and for a small image FastAPI's machinery (its own
middleware layers, route matching, solving the route's dependencies, validating the query) cost
more of the event loop than everything the request needs done. An admitted /detect request
whose query is plain (absent, or values in the simple forms below) is answered here, by the same
functions as the route in app.api.routes: the same key check, parameters, upload reading,
detection, answer and error bodies. Anything else (a value to validate the long way, a request
the admission gate did not route) goes on to FastAPI unchanged, which answers it as before, with
its 422s; nothing has been read from the request by then.

It sits inside the admission gate and the outer middlewares (request id, metrics, access log,
security headers, CORS), which see its answers as any route's.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import MAX_DETECTIONS, MAX_NAME_CHARS, AppState, bind, params_for
from app.api.errors import service_error_response, unexpected_error_response
from app.api.keys import authorize
from app.api.routes import result_json, until_disconnect
from app.api.uploads import read_image
from app.errors import ServiceError
from app.model_repository import MAX_VERSION
from app.service import Detector

PATH = "/detect"
# The forms taken here; any other spelling of a value goes to FastAPI, which validates it.
_DECIMAL = re.compile(r"[0-9]{1,8}(?:\.[0-9]{1,16})?\Z")
_COUNT = re.compile(r"[1-9][0-9]{0,2}\Z")
_VERSION = re.compile(r"[1-9][0-9]{0,9}\Z")
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
_ORIENTATIONS = ("exif", "stored")
_NO_TILING = ("none", "off", "0", "false", "")
MAX_CLASSES_CHARS = 4096


def _fraction(text: str) -> float | None:
    """A number from 0 to 1 in plain decimal, or None."""
    if not _DECIMAL.match(text):
        return None
    value = float(text)
    return value if value <= 1 else None


def plain_query(query_string: bytes) -> dict[str, Any] | None:
    """The query's detection parameters when every one is in a plain form (the last of a
    repeated name counts, unknown names are ignored, as FastAPI reads a query); None when one
    is not, and FastAPI must validate the query."""
    if not query_string:
        return {}
    fields = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    params: dict[str, Any] = {}
    for name, text in fields.items():
        if name == "score_threshold" or name == "dedupe_iou":
            if (value := _fraction(text)) is None:
                return None
            params[name] = value
        elif name == "max_detections":
            if not _COUNT.match(text) or int(text) > MAX_DETECTIONS:
                return None
            params[name] = int(text)
        elif name == "clip":
            if text not in _BOOLEANS:
                return None
            params[name] = _BOOLEANS[text]
        elif name == "orientation":
            if text not in _ORIENTATIONS:
                return None
            params[name] = text
        elif name == "classes":
            if len(text) > MAX_CLASSES_CHARS:
                return None
            params[name] = text
        elif name == "version":  # (empty: FastAPI refuses it, as no integer)
            if not _VERSION.match(text) or int(text) > MAX_VERSION:
                return None
        elif name == "tile" and text in _NO_TILING:  # what the web page sends untiled
            params["tiling"] = None
        elif (name == "model" and len(text) > MAX_NAME_CHARS) or name.startswith("tile"):
            return None  # (tile*: FastAPI's route reads and validates the tiling)
    return params


class DetectFastPath:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.settings = state.settings
        self.key_checked = PATH not in state.settings.open_path_set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        # Routed by the admission gate, which holds its places: else FastAPI says why not.
        detector: Detector | None = scope.get("state", {}).get("detector")
        query = plain_query(scope["query_string"]) if detector is not None else None
        if detector is None or query is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            if self.key_checked:
                authorize(self.settings, request.headers)
            bind(request, detector)
            params = params_for(detector, **query)
            upload = read_image(request, detector.settings)
            result = await until_disconnect(request, detector.detect(await upload, params))
        except ServiceError as exc:
            await service_error_response(exc, self.state.metrics, PATH)(scope, receive, send)
            return
        except Exception as exc:  # as the route's handler for the unexpected: logged, a 500
            await unexpected_error_response(exc, self.state.metrics, PATH)(scope, receive, send)
            return
        scope["state"]["batch_size"] = result.batch_size  # for the access log
        body = result_json(detector, result)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
