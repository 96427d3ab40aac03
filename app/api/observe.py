"""Per-request observation (plain ASGI, so bodies and disconnects pass through untouched):
the X-Request-ID, Prometheus request metrics, one access-log line per request, and a sampled
detection's root span (app.tracing), whose ``traceparent`` goes back to the caller."""

from __future__ import annotations

import logging
import random
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.admission import DETECT_PATHS, target
from app.logs import log_later
from app.metrics import Metrics
from app.tracing import RequestTrace, Tracing

access_log = logging.getLogger("dfine.access")

REQUEST_ID_HEADER = b"x-request-id"
TRACEPARENT = b"traceparent"
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")  # echoed into headers and logs: keep it tame
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters escaped (\\x0a): a path like /a%0A... cannot forge a
    second line in a text log."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def endpoint_of(scope: Scope, known_paths: tuple[str, ...]) -> str:
    """The route's path template (bounded label values), or 'other' for unknown paths."""
    path = getattr(scope.get("route"), "path", None)
    if path is None and scope.get("path") in known_paths:  # answered before routing
        path = scope["path"]
    return str(path) if path else "other"


def traced_route(scope: Scope) -> str | None:
    """The route a traced request's span is named after: the detections (/detect*, and the
    Open Inference Protocol's infer), None for any other request."""
    path = scope["path"]
    if scope["method"] != "POST":
        return None
    if path in DETECT_PATHS:
        return str(path)
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path.count("/")
        if parts == 4:
            return "/v2/models/{name}/infer"
        if parts == 6 and "/versions/" in path:
            return "/v2/models/{name}/versions/{version}/infer"
    return None


def begin_trace(tracing: Tracing, scope: Scope, started: float) -> RequestTrace | None:
    """A sampled detection's root span (continuing the caller's ``traceparent``), else None."""
    route = traced_route(scope)
    if route is None:
        return None
    model, _ = target(scope, scope["path"])
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
               if k in (TRACEPARENT, b"tracestate")}
    return tracing.begin(f"POST {route}", model, carrier, started, {
        "http.request.method": "POST", "http.route": route,
        "url.path": printable(scope["path"])})


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: tuple[str, ...],
                 tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"")
        # An id to correlate logs, not a secret: no system call for randomness on each request.
        request_id = given if _VALID_ID.match(given) else b"%032x" % random.getrandbits(128)
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        status = 500
        trace = None
        if self.tracing is not None and self.tracing.active:  # all that tracing off costs
            trace = begin_trace(self.tracing, scope, started)
        added = [(REQUEST_ID_HEADER, request_id)]
        if trace is not None:
            added.append((TRACEPARENT, trace.traceparent.encode()))

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            elapsed = time.perf_counter() - started
            endpoint = endpoint_of(scope, self.known_paths)
            # The model version that answered (app.api.deps.bind); empty for the others.
            model = scope["state"].get("model", "")
            version = scope["state"].get("version", "")
            self.metrics.observe_request(endpoint, status, model, version, elapsed)
            if trace is not None:
                trace.finish(status, (("dfine.model", model), ("dfine.version", version),
                                      ("dfine.request_id", request_id.decode())),
                             started + elapsed)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                request_id_text = request_id.decode()
                log_later(access_log, logging.INFO, "%s %s %d %.1fms id=%s", (
                    scope["method"], printable(scope["path"]), status, elapsed * 1000,
                    request_id_text), {
                    "request_id": request_id_text, "method": scope["method"],
                    "path": scope["path"], "status": status,
                    "latency_ms": round(elapsed * 1000, 2), "client": client[0],
                    "batch_size": scope["state"].get("batch_size"),
                    "model": model or None, "version": version or None,
                    **({"trace_id": trace.trace_id} if trace is not None else {})})
