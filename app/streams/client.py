"""A client sending its own frames (a browser's camera over a WebSocket): each frame through
the model's batcher, answered with its detections and track ids.

The client may send faster than the service serves: while one frame is processed, the newest
frame received waits, and a newer one replaces it (the older dropped, counted in the next
answer). What a session holds is bounded: one frame processed, one waiting, each at most
STREAM_MAX_FRAME_BYTES (the WebSocket's message limit).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from app.errors import InvalidRequest, ServiceError
from app.metrics import StreamMetrics
from app.routing import Routing
from app.service import Detector, DetectParams
from app.streams.spec import StreamRequest
from app.streams.stream import ParamsFor, detections_json

Receive = Callable[[], Awaitable[bytes | str | None]]  # None: the client has gone
Send = Callable[[dict[str, Any]], Awaitable[None]]
ADJUSTABLE = ("score_threshold", "max_detections", "classes", "dedupe_iou")


class ClientSession:
    def __init__(self, request: StreamRequest, registry: Routing, metrics: StreamMetrics,
                 params_for: ParamsFor, max_frame_bytes: int) -> None:
        self.request, self.registry, self.metrics = request, registry, metrics
        self._params_for, self._max_frame_bytes = params_for, max_frame_bytes
        self._waiting: tuple[int, bytes] | None = None
        self._arrived = asyncio.Event()
        self._received = 0
        self._last_answered = 0  # the frame number answered last
        self.dropped_total = 0
        self._gone = False
        self._tracker: Any = None
        self._params: tuple[int, DetectParams] | None = None
        self._processed = metrics.client_frames.labels("processed")
        self._dropped = metrics.client_frames.labels("dropped")
        self._failed = metrics.client_frames.labels("failed")

    async def run(self, receive: Receive, send: Send) -> None:
        """Until the client goes: frames in, answers out."""
        receiving = asyncio.create_task(self._receive(receive))
        try:
            while True:
                self._arrived.clear()
                if self._waiting is None:
                    if self._gone:
                        return
                    waiter = asyncio.create_task(self._arrived.wait())
                    await asyncio.wait({waiter, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if receiving.done() and self._waiting is None:
                        receiving.result()  # its error, if any
                        return
                    continue
                number, data = self._waiting
                self._waiting = None
                await send(await self._answer(number, data))
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiving

    async def _receive(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message is None:
                self._gone = True
                self._arrived.set()
                return
            if isinstance(message, str):
                self._adjust(message)
                continue
            self._received += 1
            if self._waiting is not None:  # a newer frame wins
                self.dropped_total += 1
                self._dropped.inc()
            self._waiting = (self._received, message)
            self._arrived.set()

    def _adjust(self, text: str) -> None:
        """A text message changes the session's parameters: {"score_threshold": 0.6}."""
        try:
            changes = orjson.loads(text)
            if not isinstance(changes, dict) or not set(changes) <= set(ADJUSTABLE):
                raise ValueError
            self.request = StreamRequest.model_validate(
                {**self.request.model_dump(), **changes})
        except Exception:
            return
        self._params = None  # rebuilt for the next frame, and the tracker's threshold with it

    async def _answer(self, number: int, data: bytes) -> dict[str, Any]:
        try:
            if len(data) > self._max_frame_bytes:
                raise InvalidRequest(f"a frame of {len(data)} bytes; STREAM_MAX_FRAME_BYTES is "
                                     f"{self._max_frame_bytes}")
            detector = self.registry.resolve(self.request.model, self.request.version)
            result = await detector.detect_frame(data, self._detect_params(detector))
        except ServiceError as exc:
            self._failed.inc()
            self._last_answered = number
            return {"frame": number, "error": {"code": exc.code, "message": exc.message}}
        del data
        track_ids: list[int | None] = [None] * len(result.detections)
        if self.request.tracking:
            if self._tracker is None:
                from app.streams.tracking import tracker_or_none

                self._tracker = tracker_or_none(
                    10.0, self._detect_params(detector).score_threshold) or False
            if self._tracker is not False:
                track_ids = await asyncio.to_thread(self._tracker.update, result.detections)
        self._processed.inc()
        # The frames between this one and the one answered before were dropped (a frame that
        # failed was answered, with its error).
        dropped, self._last_answered = number - self._last_answered - 1, number
        return {"frame": number, "model": detector.name, "version": detector.version,
                "width": result.width, "height": result.height,
                "detections": detections_json(result.detections, track_ids),
                "dropped": dropped, "dropped_total": self.dropped_total,
                "timing_ms": result.timing_ms}

    def _detect_params(self, detector: Detector) -> DetectParams:
        if self._params is None or self._params[0] != detector.serial:
            self._params = (detector.serial, self._params_for(detector, self.request))
            if self._tracker is not None:
                self._tracker.set_score_threshold(self._params[1].score_threshold)
        return self._params[1]
