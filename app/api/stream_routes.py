"""Video routes: server-side streams (create, list, read, delete; their detections as
Server-Sent Events, a preview as MJPEG) and clients' frames over a WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import cv2
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Header, Query, Response, WebSocket
from fastapi.responses import StreamingResponse
from starlette.websockets import WebSocketDisconnect

from app.api.deps import StateDep, get_state, params_for, require_api_key
from app.api.errors import AUTH_ERRORS
from app.api.keys import authorize
from app.errors import InvalidImage, Overloaded, ServiceError, Unauthorized
from app.postprocess import Detection
from app.render import draw
from app.service import Detector, DetectParams
from app.streams.client import ClientSession
from app.streams.manager import StreamManager
from app.streams.spec import StreamList, StreamRequest, StreamStatus
from app.streams.stream import Published, Stream

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["streams"])
socket_router = APIRouter()  # WebSockets: the key is checked by the route (a query may carry it)

HEARTBEAT_S = 15.0
MAX_SUBSCRIBERS = 32  # event readers per stream
MAX_PREVIEWS = 4  # preview readers per stream (each frame drawn and encoded for each)
PREVIEW_FPS = 10.0
PREVIEW_QUALITY = 80
STREAM_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS, 403: {"description": "the source is not allowed (STREAM_SOURCES, VIDEO_DIR)"},
    404: {"description": "no such stream, or an unknown model"},
    422: {"description": "not a source, or bad parameters"},
    503: {"description": "MAX_STREAMS streams run already, or the service is stopping"}}


def stream_params(detector: Detector, request: StreamRequest) -> DetectParams:
    """A stream's detection parameters: its own, else the model's settings (as /detect)."""
    return params_for(detector, request.score_threshold, request.max_detections,
                      request.classes_text(), dedupe_iou=request.dedupe())


def _manager(state: StateDep) -> StreamManager:
    assert state.streams is not None
    return state.streams


Manager = Annotated[StreamManager, Depends(_manager)]


@router.post("/streams", status_code=201, response_model=StreamStatus, responses=STREAM_ERRORS,
             summary="Watch a camera stream, an MJPEG or video URL, or a video file")
async def create_stream(body: StreamRequest, manager: Manager, response: Response
                        ) -> StreamStatus:
    stream = await manager.create(body)
    response.headers["Location"] = f"/streams/{stream.id}"
    return stream.status()


@router.get("/streams", response_model=StreamList, summary="Every stream and its state")
async def list_streams(manager: Manager) -> StreamList:
    return StreamList(streams=[s.status() for s in manager.list()])


@router.get("/streams/{stream_id}", response_model=StreamStatus, responses=STREAM_ERRORS,
            summary="A stream's state and counts")
async def get_stream(stream_id: str, manager: Manager) -> StreamStatus:
    return manager.get(stream_id).status()


@router.delete("/streams/{stream_id}", status_code=204, responses=STREAM_ERRORS,
               summary="Stop a stream and forget it")
async def delete_stream(stream_id: str, manager: Manager) -> Response:
    await manager.delete(stream_id)
    return Response(status_code=204)


def _sse(kind: str, body: dict[str, Any]) -> bytes:
    event_id = b"id: %d\n" % body["frame"] if kind == "frame" else b""
    return event_id + b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


@router.get("/streams/{stream_id}/events", responses=STREAM_ERRORS,
            summary="A stream's detections, frame by frame, as Server-Sent Events",
            response_class=StreamingResponse)
async def stream_events(
    stream_id: str, manager: Manager,
    after: Annotated[int | None, Query(
        ge=-1, description="first the kept frame events (the last 256) after this frame; -1: "
                           "all of them")] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    """`event: frame` for each processed frame (frame number, source timestamp, detections with
    track ids, frames dropped since the previous one, lag); `event: state` on each change of
    state; `event: end` last, once the stream has ended, failed or was deleted. Frame events
    carry the frame number as their id: a reader that reconnects (Last-Event-ID) misses none
    of the last 256."""
    stream = manager.get(stream_id)
    if stream.event_readers >= MAX_SUBSCRIBERS:
        raise Overloaded(f"a stream has {MAX_SUBSCRIBERS} event readers at most")
    if after is None and last_event_id is not None and last_event_id.strip().isdigit():
        after = int(last_event_id)
    stream.event_readers += 1
    body = _held(_events(stream, after), lambda: setattr(
        stream, "event_readers", stream.event_readers - 1))
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _held(body: AsyncIterator[bytes], release: Callable[[], object]) -> AsyncIterator[bytes]:
    """``body``, whose reader's place (taken by the route, so that concurrent requests cannot
    pass the bound) is given back once: when it ends, or when it is dropped unsent (a client
    gone before the response started runs none of it)."""
    given_back = False

    def give_back() -> None:
        nonlocal given_back
        if not given_back:
            given_back = True
            release()

    async def iterate() -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            give_back()

    wrapped = iterate()
    weakref.finalize(wrapped, give_back)
    return wrapped


async def _events(stream: Stream, after: int | None) -> AsyncIterator[bytes]:
    # Subscribed here, not in the route: a response never sent runs none of its generator,
    # and a subscriber taken before it would never be given back.
    subscriber = stream.subscribe(after)
    try:
        while True:
            if not subscriber.events:
                subscriber.ready.clear()
                try:
                    await asyncio.wait_for(subscriber.ready.wait(), HEARTBEAT_S)
                except TimeoutError:
                    yield b": heartbeat\n\n"
                continue
            kind, body = subscriber.events.popleft()
            yield _sse(kind, body)
            if kind == "end":
                return
    finally:
        stream.subscribers.discard(subscriber)


@router.get("/streams/{stream_id}/preview", responses=STREAM_ERRORS,
            summary="A stream's frames with their boxes and track ids drawn, as MJPEG",
            response_class=StreamingResponse)
async def stream_preview(stream_id: str, manager: Manager) -> StreamingResponse:
    """`multipart/x-mixed-replace` JPEGs (an `<img src>` shows it), up to 10 a second."""
    stream = manager.get(stream_id)
    if stream.previews >= MAX_PREVIEWS:
        raise Overloaded(f"a stream has {MAX_PREVIEWS} preview readers at most")
    stream.previews += 1
    body = _held(_preview(stream), lambda: setattr(stream, "previews", stream.previews - 1))
    return StreamingResponse(body, media_type="multipart/x-mixed-replace; "
                             "boundary=frame", headers={"Cache-Control": "no-store"})


async def _preview(stream: Stream) -> AsyncIterator[bytes]:
    shown: Published | None = None
    while not stream.ended:
        latest = stream.latest
        if latest is None or latest is shown or (latest.frame.video is None
                                                 and latest.frame.jpeg is None):
            stream.latest_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stream.latest_changed.wait(), HEARTBEAT_S)
            continue
        shown = latest
        started = time.perf_counter()
        jpeg = await asyncio.to_thread(_draw, latest)
        yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
               + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
        await asyncio.sleep(max(0.0, 1 / PREVIEW_FPS - (time.perf_counter() - started)))


def _draw(published: Published) -> bytes:
    frame = published.frame
    if frame.jpeg is not None:
        decoded = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise InvalidImage()
        image: np.ndarray = decoded
    else:
        image = frame.pixels("bgr24")
    labelled = [Detection(d.class_id, d.label if t is None else f"{d.label} #{t}", d.score,
                          d.box) for d, t in zip(published.detections, published.track_ids,
                                                 strict=True)]
    ok, encoded = cv2.imencode(".jpg", draw(image, labelled),
                               [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_QUALITY])
    assert ok
    return bytes(encoded)


@socket_router.websocket("/streams/client")
async def client_frames(
    websocket: WebSocket,
    model: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[int | None, Query(ge=1)] = None,
    score_threshold: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_detections: Annotated[int | None, Query(ge=1, le=300)] = None,
    classes: Annotated[str | None, Query(max_length=4096)] = None,
    tracking: bool = True,
    dedupe_iou: Annotated[float | None, Query(ge=0, le=1)] = None,
    api_key: Annotated[str | None, Query(max_length=1024)] = None,
) -> None:
    """Frames from the client (binary messages, JPEG or PNG), each answered with its
    detections (a text message, JSON); the newest waiting frame wins. See docs/video.md."""
    state = await get_state(websocket)  # type: ignore[arg-type]
    headers = {k.lower(): v for k, v in websocket.headers.items()}
    if api_key:
        headers["x-api-key"] = api_key
    # Refusals are close codes after the handshake, not an HTTP 403 before it: a browser
    # sees a close code and its reason, never the status of a failed handshake.
    try:
        authorize(state.settings, headers)
    except Unauthorized:
        await _refuse(websocket, 1008, "unauthorized: send the API key (X-API-Key, or the "
                                       "api_key query parameter)")
        return
    metrics = state.metrics.streams
    if state.draining or state.client_sessions >= state.settings.max_client_streams:
        await _refuse(websocket, 1013, "MAX_CLIENT_STREAMS sessions are open, or the service "
                                       "is stopping: retry later")
        return
    try:
        request = StreamRequest(source="client", model=model, version=version,
                                score_threshold=score_threshold,
                                max_detections=max_detections,
                                classes=classes.split(",") if classes else None,
                                tracking=tracking, dedupe_iou=dedupe_iou)
        detector = state.registry.find(model, version)
        if detector is not None:
            stream_params(detector, request)
    except (ServiceError, ValueError) as exc:
        await _refuse(websocket, 1008, getattr(exc, "message", "bad parameters"))
        return
    state.client_sessions += 1  # before the accept's await: concurrent handshakes see it
    metrics.client_sessions.inc()
    try:
        await websocket.accept()
    except BaseException:
        state.client_sessions -= 1
        metrics.client_sessions.dec()
        raise
    session = ClientSession(request, state.registry, metrics, stream_params,
                            state.settings.stream_max_frame_bytes)

    async def receive() -> bytes | str | None:
        try:
            message = await websocket.receive()
        except WebSocketDisconnect:
            return None
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        return data if data is not None else message.get("text") or ""

    async def send(body: dict[str, Any]) -> None:
        await websocket.send_text(orjson.dumps(body).decode())

    try:
        await session.run(receive, send)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went while an answer was sent
    finally:
        state.client_sessions -= 1
        metrics.client_sessions.dec()
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close()


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.accept()
    await websocket.close(code=code, reason=reason[:120])  # a close reason is 123 bytes at most
