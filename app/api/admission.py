"""Admission at the door: each detection request holds places for its images from before
routing until its response, or is refused with a prebuilt 503.

Under overload most requests are refusals. Answering each through routing, dependencies and
the exception handlers cost more CPU than the engine could spare (64 clients, queue of 8:
throughput fell to half of the ceiling). Refusals here are cheap, and come after a short wait
for a place (ADMISSION_WAIT_MS) that paces clients which retry at once.

A place is not held for a slow upload. 40 sockets that sent one byte every 10 s held every
place, and every good request got 503 for as long as they lived. An upload still arriving
UPLOAD_HOLD_MS after admission gives its place back and continues as a slow upload (at most
MAX_SLOW_UPLOADS at once, the others get 408); when its body is complete it takes a place
again, or gets 503 like any request when there is none.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import AppState
from app.errors import Overloaded, ReadTimeout
from app.service import Detector

DETECT_PATHS = ("/detect", "/detect/batch", "/detect/render")
_BODY = orjson.dumps({"error": {"code": Overloaded.code, "message": Overloaded.message}})
_HEADERS = [(b"content-type", b"application/json"), (b"retry-after", b"1"),
            (b"content-length", str(len(_BODY)).encode())]


class AdmissionGate:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.wait_s = state.settings.admission_wait_ms / 1000
        self.hold_s = state.settings.upload_hold_ms / 1000
        self.max_slow = state.settings.max_slow_uploads
        self.slow_uploads = 0  # uploads still arriving that gave their place back

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
        upload = _Upload(self, detector, images, receive)
        try:
            await self.app(scope, upload.receive, send)
        finally:
            upload.close()


class _Upload:
    """One admitted request's body as it arrives, and the places it holds meanwhile."""

    def __init__(self, gate: AdmissionGate, detector: Detector, images: int,
                 receive: Receive) -> None:
        self.gate, self.detector, self.images, self._receive = gate, detector, images, receive
        self.held = images  # places held now
        self.slow = False  # gave its place back and counts as a slow upload
        self.cut = False  # too slow while MAX_SLOW_UPLOADS others are: 408 at its next chunk
        self.complete = False
        self._timer = asyncio.get_running_loop().call_later(gate.hold_s, self._too_slow)

    def _too_slow(self) -> None:
        if self.complete:
            return
        self.detector.release(self.held)
        self.held = 0
        if self.gate.slow_uploads >= self.gate.max_slow:
            self.cut = True
        else:
            self.slow = True
            self.gate.slow_uploads += 1

    def _not_slow(self) -> None:
        if self.slow:
            self.slow = False
            self.gate.slow_uploads -= 1

    async def receive(self) -> Message:
        if self.cut:
            raise ReadTimeout("the upload is too slow while the service is busy")
        message = await self._receive()
        if (not self.complete and message["type"] == "http.request"
                and not message.get("more_body", False)):
            self.complete = True
            self._timer.cancel()
            if self.held == 0 and not self.cut:  # a place again, or 503 (handled as errors are)
                self._not_slow()
                await self.detector.acquire(self.images, self.gate.wait_s)
                self.held = self.images
        return message

    def close(self) -> None:
        self._timer.cancel()
        self._not_slow()
        if self.held:
            self.detector.release(self.held)
            self.held = 0
