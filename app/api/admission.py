"""Admission at the door: each detection request holds places for its images from before
routing until its response, or is refused with a prebuilt 503.

Under overload most requests are refusals. Answering each through routing, dependencies and
the exception handlers cost more CPU than the engine could spare (64 clients, queue of 8:
throughput fell to half of the ceiling). Refusals here are cheap, and come after a short wait
for a place (ADMISSION_WAIT_MS) that paces clients which retry at once.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import AppState
from app.errors import Overloaded

DETECT_PATHS = ("/detect", "/detect/batch", "/detect/render")
_BODY = orjson.dumps({"error": {"code": Overloaded.code, "message": Overloaded.message}})
_HEADERS = [(b"content-type", b"application/json"), (b"retry-after", b"1"),
            (b"content-length", str(len(_BODY)).encode())]


class AdmissionGate:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.wait_s = state.settings.admission_wait_ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        detector = self.state.detector
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] not in DETECT_PATHS or detector is None
                or not detector.accepting):
            await self.app(scope, receive, send)  # the routes answer not_ready themselves
            return
        images = (self.state.settings.max_batch_images if scope["path"] == "/detect/batch"
                  else 1)
        try:
            await detector.acquire(images, self.wait_s)
        except Overloaded:
            self.state.metrics.errors.labels(code=Overloaded.code).inc()
            await send({"type": "http.response.start", "status": 503, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": _BODY})
            return
        scope.setdefault("state", {})["admitted"] = True
        try:
            await self.app(scope, receive, send)
        finally:
            detector.release(images)
