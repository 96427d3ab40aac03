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
from urllib.parse import parse_qs

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import AppState
from app.errors import Overloaded, ReadTimeout
from app.model_repository import parse_version
from app.service import Detector

DETECT_PATHS = ("/detect", "/detect/batch", "/detect/render")

def _refusal(body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return body, [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                  (b"content-length", str(len(body)).encode())]


_REFUSAL = _refusal(orjson.dumps({"error": {"code": Overloaded.code,
                                            "message": Overloaded.message}}))
_V2_REFUSAL = _refusal(orjson.dumps({"error": Overloaded.message}))  # the protocol's form


INVALID = -1  # a version that is not a positive integer: the route says so


def _is_infer(path: str) -> bool:
    return path.startswith("/v2/models/") and path.endswith("/infer")


def _version(text: str | None) -> int | None:
    try:
        return parse_version(text)
    except ValueError:
        return INVALID


def target(scope: Scope, path: str) -> tuple[str | None, int | None]:
    """The model and version a detection names: ``model`` and ``version`` in the query of
    /detect*, or the path of /v2/models/<name>[/versions/<v>]/infer (as the routes read
    them); version INVALID if it is not a positive integer."""
    if _is_infer(path):
        parts = path.split("/")  # "", "v2", "models", name, [versions, v,] infer
        if len(parts) == 5:
            return parts[3], None
        if len(parts) == 7 and parts[4] == "versions":
            return parts[3], _version(parts[5])
        return None, INVALID
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    names, versions = query.get("model", []), query.get("version", [])
    return (names[-1] or None if names else None), _version(versions[-1] if versions else None)


class AdmissionGate:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.wait_s = state.settings.admission_wait_ms / 1000
        self.hold_s = state.settings.upload_hold_ms / 1000
        self.max_slow = state.settings.max_slow_uploads
        self.slow_uploads = 0  # uploads still arriving that gave their place back
        # What slow uploads may hold together: MAX_SLOW_UPLOADS uploads of MAX_UPLOAD_BYTES,
        # as the memory bound counts them, whatever each may send (a /v2 body can carry 16
        # images: 12 paced ones reached 2.4 GB against a bound of 1.5 GB).
        self.slow_budget = state.settings.max_slow_uploads * state.settings.max_upload_bytes
        self.slow_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        detector = None
        if (scope["type"] == "http" and scope["method"] == "POST"
                and (path in DETECT_PATHS or _is_infer(path))):
            name, version = target(scope, path)
            if version != INVALID:
                detector = self.state.registry.find(name, version)
        if detector is None or not detector.accepting:
            # Not a detection, or nothing to run it on: the routes answer why themselves.
            await self.app(scope, receive, send)
            return
        images = self._images(scope, path)
        try:
            # A request of several images is not kept waiting at the door (it would hold back
            # every one-image request behind it).
            await detector.acquire(images, self.wait_s if images == 1 else 0)
        except Overloaded:
            self.state.metrics.errors.labels(code=Overloaded.code).inc()
            body, headers = _V2_REFUSAL if _is_infer(path) else _REFUSAL
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        # The route runs on this version (app.api.deps.admitted), where its places are held.
        scope.setdefault("state", {}).update(admitted=True, places=images, detector=detector)
        upload = _Upload(self, detector, images, receive)
        try:
            await self.app(scope, upload.receive, send)
        finally:
            upload.close()


    def _images(self, scope: Scope, path: str) -> int:
        """Places to hold: one for /detect; the most a batch may hold for /detect/batch; for a
        v2 inference, as many as its declared body could hold (the route takes more if it
        turns out to carry more images)."""
        settings = self.state.settings
        if path == "/detect/batch":
            return settings.max_batch_images
        if not _is_infer(path):
            return 1
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if not declared.isdigit():
            return settings.max_batch_images
        return max(1, min(settings.max_batch_images,
                          -(-int(declared) // settings.max_upload_bytes)))


class _Upload:
    """One admitted request's body as it arrives, and the places it holds meanwhile."""

    def __init__(self, gate: AdmissionGate, detector: Detector, images: int,
                 receive: Receive) -> None:
        self.gate, self.detector, self.images, self._receive = gate, detector, images, receive
        self.held = images  # places held now
        self.slow = False  # gave its place back and counts as a slow upload
        self.cut = False  # too slow while MAX_SLOW_UPLOADS others are: 408 at its next chunk
        self.complete = False
        self.received = 0  # body bytes so far
        self.slow_bytes = 0  # what of them the gate's slow budget counts (while slow)
        self._timer = asyncio.get_running_loop().call_later(gate.hold_s, self._too_slow)

    def _too_slow(self) -> None:
        if self.complete:
            return
        self.detector.release(self.held)
        self.held = 0
        # What it holds already counts against the slow budget from now on, with the rest.
        if (self.gate.slow_uploads >= self.gate.max_slow
                or self.gate.slow_bytes + self.received > self.gate.slow_budget):
            self.cut = True
        else:
            self.slow = True
            self.gate.slow_uploads += 1
            self.slow_bytes = self.received
            self.gate.slow_bytes += self.received

    def _not_slow(self) -> None:
        if self.slow:
            self.slow = False
            self.gate.slow_uploads -= 1
        self.gate.slow_bytes -= self.slow_bytes
        self.slow_bytes = 0

    async def receive(self) -> Message:
        if self.cut:
            raise ReadTimeout("the upload is too slow while the service is busy")
        message = await self._receive()
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            self.received += size
            if self.slow:
                self.slow_bytes += size
                self.gate.slow_bytes += size
                if self.gate.slow_bytes > self.gate.slow_budget:  # this one pushed it over
                    self.cut = True
                    raise ReadTimeout("the upload is too slow while the service is busy")
        if (not self.complete and message["type"] == "http.request"
                and not message.get("more_body", False)):
            self.complete = True
            self._timer.cancel()
            if self.held == 0 and not self.cut:  # a place again, or 503 (handled as errors are)
                self._not_slow()
                await self.detector.acquire(self.images,
                                            self.gate.wait_s if self.images == 1 else 0)
                self.held = self.images
        return message

    def close(self) -> None:
        self._timer.cancel()
        self._not_slow()
        if self.held:
            self.detector.release(self.held)
            self.held = 0
