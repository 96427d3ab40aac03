"""One server-side stream: its source read by a thread (app.streams.sources), its frames
through the model's batcher beside /detect's requests, its detections (with track ids)
published to its subscribers.

Live sources: the reader never waits; a frame not yet taken when a newer one arrives is dropped
(counted), so lag stays bounded by the engine's pace, never by a buffer. Files: the reader
waits for each frame to be taken, so every frame (or every fps-capped one) is processed.
A stream takes at most STREAM_FRAMES_IN_FLIGHT frames at once, and publishes them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from app.config import Settings
from app.errors import ServiceError
from app.metrics import StreamMetrics
from app.postprocess import Detection, detection_json
from app.routing import Routing
from app.service import Detector, DetectParams
from app.streams.policy import Source
from app.streams.sources import Frame, Reader, SourceError
from app.streams.spec import ENDED_STATES, StreamRequest, StreamState, StreamStatus
from app.threads import name_os_thread

log = logging.getLogger("dfine.streams")

RATE_WINDOW_S = 5.0
BACKOFF_START_S = 0.5
MAX_EVENTS_WAITING = 64  # per subscriber: a slow one loses its oldest events, never blocks
# Frame events kept for readers that subscribe late or come back (SSE's Last-Event-ID): a
# file's first frames are published before a client that created the stream can subscribe.
HISTORY_EVENTS = 256
HISTORY_DETECTIONS = 8192  # and at most this many detections in them (about 1.5 MB)
# A live source's frames are read at most this fast (a faster one waits on its socket): a
# source sending tiny frames as fast as it can would otherwise cost a core to parse.
MAX_INTAKE_FPS = 120.0


class _Readers:
    """Reader threads alive, the service's: one of a deleted stream may wait out its read
    timeout before it ends, and those are bounded too (``StreamManager.create``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.alive = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.alive += count


READERS = _Readers()
ParamsFor = Callable[[Detector, StreamRequest], DetectParams]


@dataclass
class _End:
    error: SourceError | None


class Handoff:
    """Frames from the reader thread to the stream's task, one at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Condition()
        self._frame: Frame | None = None
        self._end: _End | None = None
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, frame: Frame, wait: bool) -> Frame | bool | None:
        """From the reader: hand ``frame`` over. ``wait`` (a file): until the previous one is
        taken. Else it replaces a frame not taken yet, which is returned (dropped). False once
        closed."""
        with self._lock:
            while wait and self._frame is not None and not self._closed:
                self._lock.wait(0.5)
            if self._closed:
                return False
            replaced, self._frame = self._frame, frame
        if replaced is None:  # else the loop was woken for the frame replaced, and not yet ran
            self._loop.call_soon_threadsafe(self._ready.set)
        return replaced

    def end(self, error: SourceError | None) -> None:
        with self._lock:
            self._end = _End(error)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._ready.set)

    def close(self) -> None:
        """No more frames are taken: a waiting reader returns."""
        with self._lock:
            self._closed = True
            self._frame = None
            self._lock.notify_all()

    async def get(self) -> Frame | _End:
        while True:
            self._ready.clear()
            with self._lock:
                frame, self._frame = self._frame, None
                if frame is not None:
                    self._lock.notify_all()
                    return frame
                if self._end is not None:
                    return self._end
            await self._ready.wait()


class Rate:
    """Events a second over the last RATE_WINDOW_S whole seconds, counted in one-second
    buckets (ticked from one thread, read from another: a dict's copy is atomic)."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def tick(self, now: float) -> None:
        second = int(now)
        self._counts[second] = self._counts.get(second, 0) + 1
        if len(self._counts) > RATE_WINDOW_S + 2:
            for old in [k for k in self._counts if k < second - RATE_WINDOW_S - 1]:
                del self._counts[old]

    def per_second(self) -> float:
        second = int(time.perf_counter())
        counts = dict(self._counts)
        window = range(second - int(RATE_WINDOW_S), second)
        return round(sum(counts.get(k, 0) for k in window) / RATE_WINDOW_S, 2)


@dataclass
class Published:
    """One processed frame, as subscribers see it."""

    frame: Frame
    width: int
    height: int
    detections: list[Detection]
    track_ids: list[int | None]
    dropped: int  # frames dropped since the previous one published
    lag_s: float

    def body(self) -> dict[str, Any]:
        return {
            "frame": self.frame.index, "timestamp_s": self.frame.timestamp_s,
            "width": self.width, "height": self.height,
            "detections": detections_json(self.detections, self.track_ids),
            "dropped": self.dropped, "lag_s": round(self.lag_s, 4)}


def detections_json(detections: list[Detection], track_ids: list[int | None]
                    ) -> list[dict[str, Any]]:
    """/detect's detections, each with its track id."""
    return [{**detection_json(d), "track_id": track_id}
            for d, track_id in zip(detections, track_ids, strict=True)]


@dataclass(eq=False)
class Subscriber:
    """One reader of a stream's events (an SSE response): ``("frame" | "state" | "end",
    body)``, newest kept when it falls behind."""

    events: deque[tuple[str, dict[str, Any]]] = field(
        default_factory=lambda: deque(maxlen=MAX_EVENTS_WAITING))
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, kind: str, body: dict[str, Any]) -> None:
        self.events.append((kind, body))
        self.ready.set()


class Stream:
    """A source watched until it ends, fails, or is deleted."""

    def __init__(self, stream_id: str, request: StreamRequest, source: Source,
                 settings: Settings, registry: Routing, metrics: StreamMetrics,
                 params_for: ParamsFor, on_state: Callable[[], None],
                 persistent: bool = False) -> None:
        self.id, self.request, self.source = stream_id, request, source
        # Declared in STREAMS: a camera still booting when the service starts is retried,
        # not failed.
        self.persistent = persistent
        self.settings, self.registry, self.metrics = settings, registry, metrics
        self._params_for, self._on_state = params_for, on_state
        self.state: StreamState = "connecting"
        self.reason: str | None = None
        self.kind: Literal["live", "file"] | None = "file" if source.kind == "file" else (
            "live" if source.kind == "rtsp" else None)
        self.created_at = time.time()
        self.frames_in = self.frames_processed = self.frames_behind = self.frames_failed = 0
        self.frames_skipped = self.reconnects = 0
        self.lag_s: float | None = None
        self.model: str | None = request.model
        self.version: int | None = request.version
        self._rate_in, self._rate_out = Rate(), Rate()
        # The frame published last, and the frames skipped by the fps cap until then: an
        # event's ``dropped`` is the frames between it and the one before, less the skipped.
        self._last_published: tuple[int, int] = (-1, 0)
        self._next_index = 0
        self._reader: Reader | None = None
        self._task: asyncio.Task[None] | None = None
        self.subscribers: set[Subscriber] = set()
        self.history: deque[dict[str, Any]] = deque()
        self._history_detections = 0
        self.previews = 0  # preview readers (app.api.stream_routes)
        self.event_readers = 0
        self.latest: Published | None = None  # for the preview
        self.latest_changed = asyncio.Event()
        self._tracker: Any = None
        self.source_fps: float | None = None  # the source's own frame rate, where it says
        self._params: tuple[int, DetectParams] | None = None
        self._received = metrics.received.labels(stream_id)
        self._processed = metrics.processed.labels(stream_id)
        self._behind = metrics.dropped.labels(stream_id, "behind")
        self._failed = metrics.dropped.labels(stream_id, "failed")
        self._lag = metrics.lag.labels(stream_id)
        self._up = metrics.up.labels(stream_id)
        self._up.set(0)

    # --- what is seen ---------------------------------------------------------------------

    def status(self) -> StreamStatus:
        return StreamStatus(
            id=self.id, name=self.request.name, source=self.source.shown,
            kind=self.kind, state=self.state, reason=self.reason,
            model=self.model, version=self.version, tracking=self.request.tracking,
            fps=self.request.fps, fps_in=self._rate_in.per_second(),
            fps_out=self._rate_out.per_second(), frames_in=self.frames_in,
            frames_processed=self.frames_processed,
            frames_dropped=self.frames_behind + self.frames_failed,
            frames_skipped=self.frames_skipped,
            lag_s=None if self.lag_s is None else round(self.lag_s, 4),
            reconnects=self.reconnects, created_at=round(self.created_at, 3))

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def _set_state(self, state: StreamState, reason: str | None = None) -> None:
        if state == self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        if state in ("ended", "stopped"):  # not down: its up series goes (no alert for it)
            self.metrics.forget(self.id, lag=False)
        else:
            self._up.set(1 if state == "running" else 0)
        log.info("stream %s (%s): %s%s", self.id, self.source.shown, state,
                 f": {reason}" if reason else "")
        kind = "end" if self.ended else "state"
        body = self.status().model_dump()
        for subscriber in self.subscribers:
            subscriber.push(kind, body)
        if self.ended:
            self.latest = None  # its frame goes (previews end with the stream)
        self.latest_changed.set()
        self._on_state()

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"stream-{self.id}")

    async def stop(self) -> None:
        """Stop reading and processing, and end as ``stopped``."""
        if self._reader is not None:
            self._reader.stop()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self.ended:
            self._set_state("stopped")

    async def _run(self) -> None:
        backoff = BACKOFF_START_S
        connected = False
        try:
            await self._wait_for_model()
            while True:
                error, got_frames = await self._connect_and_read(connected)
                connected = connected or got_frames
                if not connected and not self.persistent:
                    self._set_state("failed", error or "the source sent no frame")
                    return
                if self.kind == "file":  # read to its end, or broken: not read again
                    if error is None:
                        self._set_state("ended")
                    else:
                        self._set_state("failed", error)
                    return
                if got_frames:
                    backoff = BACKOFF_START_S
                self._set_state("reconnecting", error or "the source ended")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.stream_reconnect_max_s)
                self.reconnects += 1
                self.metrics.reconnects.labels(self.id).inc()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: the stream fails, the service goes on
            log.exception("stream %s failed", self.id)
            self._set_state("failed", f"internal error: {type(exc).__name__}")

    async def _wait_for_model(self) -> None:
        """A stream declared in the settings starts with the service, before its model is
        ready: it connects once the model serves (or at once, if the model is unknown: its
        frames then fail with the reason)."""
        while not self.registry.ready and not self.registry.failure:
            await asyncio.sleep(0.1)

    async def _connect_and_read(self, connected: bool) -> tuple[str | None, bool]:
        """One connection: read and process frames until the source ends or breaks. Returns
        the error (None: it ended) and whether any frame came."""
        loop = asyncio.get_running_loop()
        reader = self._reader = Reader(self.source, self.settings, self._next_index)
        handoff = Handoff(loop)
        fps_cap = self.request.fps
        next_due: list[float] = []  # the source time the next frame is due, under the cap

        def deliver(frame: Frame) -> bool:
            self.frames_in += 1
            self._received.inc()
            self._rate_in.tick(frame.received)
            if reader.finite is not None and self.kind is None:
                self.kind = "file" if reader.finite else "live"
            frame.skipped = self.frames_skipped
            if fps_cap is not None:
                # Frames are due on a schedule of 1/fps steps (kept, so that a source's jitter
                # averages out), a tenth of a step early allowed; after a gap it starts again.
                at = frame.timestamp_s if frame.timestamp_s is not None else frame.received
                step = 1 / fps_cap
                if next_due and at < next_due[0] - step / 10:
                    self.frames_skipped += 1
                    return True
                due = next_due[0] + step if next_due else at + step
                next_due[:] = [due if due > at else at + step]
            replaced = handoff.put(frame, wait=self.kind == "file")
            if replaced is False:
                return False
            if replaced is not None:
                self._drop_behind()
            return True

        def read() -> None:
            name_os_thread()
            error: SourceError | None = None
            try:
                reader.read(paced)
            except SourceError as exc:
                error = exc
            except Exception as exc:
                log.exception("stream %s: reading failed", self.id)
                error = SourceError(f"internal error: {type(exc).__name__}")
            finally:
                READERS.add(-1)
            handoff.end(error)

        last_read = [0.0]

        def paced(frame: Frame) -> bool:
            if self.kind != "file":
                wait = last_read[0] + 1 / MAX_INTAKE_FPS - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                last_read[0] = time.perf_counter()
            return deliver(frame)

        READERS.add(1)
        threading.Thread(target=read, name=f"stream-{self.id[:8]}", daemon=True).start()
        self._set_state("reconnecting" if connected else "connecting", self.reason)
        try:
            try:
                first = await asyncio.wait_for(handoff.get(),
                                               self.settings.stream_open_timeout_s)
            except TimeoutError:
                return "no frame within STREAM_OPEN_TIMEOUT_S", False
            if isinstance(first, _End):
                return (str(first.error) if first.error else None), False
            self._next_index = reader.next_index
            self.source_fps = reader.frame_rate or self.source_fps
            self._set_state("running")
            error = await self._process_frames(first, handoff)
            return error, True
        finally:
            reader.stop()
            handoff.close()
            self._next_index = reader.next_index

    def _drop_behind(self) -> None:  # in the reader's thread: its own counter
        self.frames_behind += 1
        self._behind.inc()

    async def _process_frames(self, first: Frame, handoff: Handoff) -> str | None:
        """Process frames until the source ends or breaks (its error), or is silent for
        STREAM_READ_TIMEOUT_S (a source that trickles bytes and no frame: each read of it
        may still come within its timeout)."""
        room = asyncio.Semaphore(self.settings.stream_frames_in_flight)
        previous: asyncio.Future[None] | None = None
        pending: set[asyncio.Task[None]] = set()
        item: Frame | _End = first
        silent_s = self.settings.stream_read_timeout_s
        await room.acquire()
        try:
            while isinstance(item, Frame):
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                task = asyncio.create_task(self._process(item, previous, done))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(lambda _: room.release())
                previous = done
                await room.acquire()  # the handoff keeps the newest frame meanwhile
                try:
                    item = await asyncio.wait_for(handoff.get(), silent_s)
                except TimeoutError:
                    room.release()
                    if pending:
                        await asyncio.wait(pending)
                    return f"no frame for {silent_s:g} s (STREAM_READ_TIMEOUT_S)"
                if isinstance(item, _End):
                    room.release()
            if pending:
                await asyncio.wait(pending)
            return str(item.error) if item.error else None
        finally:
            for task in pending:
                task.cancel()

    async def _process(self, frame: Frame, previous: asyncio.Future[None] | None,
                       done: asyncio.Future[None]) -> None:
        try:
            published = await self._detect(frame)
            if previous is not None:
                await asyncio.shield(previous)  # published in the source's order
            if published is not None:
                if self.request.tracking:  # 1-8 ms a frame: off the event loop, in order
                    published.track_ids = await asyncio.to_thread(self._track, published)
                self._publish(published)
        finally:
            if not done.done():
                done.set_result(None)

    async def _detect(self, frame: Frame) -> Published | None:
        try:
            detector = self.registry.resolve(self.request.model, self.request.version)
            self.model, self.version = detector.name, detector.version
            params = self._detect_params(detector)
            if frame.jpeg is not None:
                result = await detector.detect_frame(frame.jpeg, params)
            else:
                result = await detector.detect_decoded(
                    partial(frame.pixels, detector.pixel_format), params)
        except ServiceError as exc:
            self.frames_failed += 1
            self._failed.inc()
            if self.reason != exc.message:
                self.reason = exc.message  # shown in the status while frames fail
            return None
        if self.reason is not None and self.state == "running":
            self.reason = None
        return Published(frame, result.width, result.height, result.detections, [], 0, 0.0)

    def _detect_params(self, detector: Detector) -> DetectParams:
        if self._params is None or self._params[0] != detector.serial:
            self._params = (detector.serial, self._params_for(detector, self.request))
        return self._params[1]

    def _publish(self, published: Published) -> None:
        if not self.request.tracking:
            published.track_ids = [None] * len(published.detections)
        now = time.perf_counter()
        published.lag_s = now - published.frame.received
        frame = published.frame
        index, skipped = self._last_published
        published.dropped = frame.index - index - 1 - (frame.skipped - skipped)
        self._last_published = (frame.index, frame.skipped)
        self.frames_processed += 1
        self.lag_s = published.lag_s
        self._processed.inc()
        self._lag.set(published.lag_s)
        self.metrics.frame_lag.observe(published.lag_s)
        self._rate_out.tick(now)
        if not self.previews:
            published.frame.video = None  # nobody draws it: its decoded pixels go now
        self.latest = published
        self.latest_changed.set()
        body = published.body()
        self._keep(body)
        for subscriber in self.subscribers:
            subscriber.push("frame", body)

    def _keep(self, body: dict[str, Any]) -> None:
        self.history.append(body)
        self._history_detections += len(body["detections"])
        while len(self.history) > HISTORY_EVENTS or (
                self._history_detections > HISTORY_DETECTIONS and len(self.history) > 1):
            self._history_detections -= len(self.history.popleft()["detections"])

    def subscribe(self, after: int | None) -> Subscriber:
        """A new reader of the stream's events: the kept frame events after frame ``after``
        (None: none of them), then the stream's state, then what comes."""
        subscriber = Subscriber(deque(maxlen=MAX_EVENTS_WAITING + HISTORY_EVENTS))
        if after is not None:
            for body in self.history:
                if body["frame"] > after:
                    subscriber.push("frame", body)
        subscriber.push("end" if self.ended else "state", self.status().model_dump())
        self.subscribers.add(subscriber)
        return subscriber

    def _track(self, published: Published) -> list[int | None]:
        if self._tracker is None:
            from app.streams.tracking import tracker_or_none

            fps = self.request.fps or self.source_fps or 10.0
            # False: not installed, no ids and no second try.
            self._tracker = tracker_or_none(fps, self._params[1].score_threshold
                                            if self._params else self.settings.score_threshold
                                            ) or False
        if self._tracker is False:
            return [None] * len(published.detections)
        ids: list[int | None] = self._tracker.update(published.detections)
        return ids
