"""The service's server-side streams: created (POST /streams, or declared in STREAMS), listed,
deleted; bounded by MAX_STREAMS and counted in the memory bound."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict

from app.config import Settings
from app.errors import NotFound, Overloaded, ServiceError
from app.metrics import StreamMetrics
from app.routing import Routing
from app.streams.policy import SourcePolicy
from app.streams.spec import DECLARED, StreamRequest
from app.streams.stream import READERS, ParamsFor, Stream

log = logging.getLogger("dfine.streams")

KEEP_ENDED = 16  # ended, failed and stopped streams kept for their status, the oldest forgotten
HISTORY_BYTES = 2_000_000  # a stream's kept events at most (HISTORY_DETECTIONS, 1.5 MB) and more
# What FFmpeg holds for one stream, in frames of its size beside the frames in flight: the
# decoder's reference frames (H.264 allows 16) and its threads' frames, and the newest frame
# waiting in the handoff and the one drawn for the preview.
DECODER_FRAMES = 24


class StreamManager:
    def __init__(self, settings: Settings, registry: Routing, metrics: StreamMetrics,
                 params_for: ParamsFor) -> None:
        self.settings, self.registry, self.metrics = settings, registry, metrics
        self.policy = SourcePolicy.of(settings)
        self._params_for = params_for
        self._streams: OrderedDict[str, Stream] = OrderedDict()
        self._stopping = False

    @staticmethod
    def clients_memory_bound_bytes(settings: Settings, tensor_bytes: int) -> int:
        """What clients' WebSocket sessions hold at once: each a frame processed and one
        waiting (encoded), and a model-ready tensor queued; their decoding is a decode
        worker's, counted with the model's."""
        return settings.max_client_streams * (2 * settings.stream_max_frame_bytes + tensor_bytes)

    @staticmethod
    def memory_bound_bytes(settings: Settings, tensor_bytes: int) -> int:
        """The most the streams hold at once: per stream, its frames in flight (a decoded
        frame and its model-ready tensor each), what FFmpeg holds (DECODER_FRAMES frames in
        YUV 4:2:0), and an HTTP source's buffered bytes (a frame's worth and FFmpeg's probe)."""
        frame_rgb = settings.stream_max_pixels * 3
        per_stream = (settings.stream_frames_in_flight * (frame_rgb + tensor_bytes)
                      + DECODER_FRAMES * settings.stream_max_pixels * 3 // 2
                      + 2 * settings.stream_max_frame_bytes + 5_000_000)
        return settings.max_streams * per_stream + (settings.max_streams + KEEP_ENDED) \
            * HISTORY_BYTES

    async def start(self) -> None:
        """Start the streams STREAMS declares; one that cannot start is logged and left out."""
        if not self.settings.streams.strip():
            return
        for request in DECLARED.validate_json(self.settings.streams):  # checked by Settings
            try:
                stream = await self.create(request, persistent=True)
            except ServiceError as exc:
                log.error("the stream %s declared in STREAMS cannot start: %s",
                          request.source, exc.message)
            else:
                log.info("stream %s declared in STREAMS: %s", stream.id, stream.source.shown)

    async def create(self, request: StreamRequest, persistent: bool = False) -> Stream:
        if self._stopping:
            raise Overloaded("the service is stopping")
        # The policy may resolve a host name (to match it against allowed networks): off the
        # event loop.
        source = await asyncio.get_running_loop().run_in_executor(None, self.policy.check,
                                                                  request.source)
        self._check_model(request)
        active = sum(1 for s in self._streams.values() if not s.ended)
        if active >= self.settings.max_streams:
            raise Overloaded(f"MAX_STREAMS ({self.settings.max_streams}) streams run already: "
                             "delete one first", retry_after_s=30)
        if READERS.alive >= 2 * self.settings.max_streams:
            raise Overloaded("streams deleted lately are still closing their sources (up to "
                             "STREAM_READ_TIMEOUT_S): retry in a few seconds", retry_after_s=5)
        stream_id = secrets.token_hex(6)
        stream = Stream(stream_id, request, source, self.settings, self.registry,
                        self.metrics, self._params_for, self._count_states, persistent)
        self._streams[stream_id] = stream
        self._forget_old()
        stream.start()
        self._count_states()
        return stream

    def _check_model(self, request: StreamRequest) -> None:
        """A model this service does not know, or classes it does not have, are refused now,
        not frame after frame (a model still loading is fine: the stream waits for it)."""
        if request.model is not None:
            self.registry.validate_name(request.model)
            if not self.registry.known(request.model):
                raise NotFound(f"unknown model {request.model!r}")
        detector = self.registry.find(request.model, request.version)
        if detector is not None:
            self._params_for(detector, request)

    def get(self, stream_id: str) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise NotFound(f"no stream {stream_id!r}")
        return stream

    def list(self) -> list[Stream]:
        return list(self._streams.values())

    async def delete(self, stream_id: str) -> None:
        stream = self.get(stream_id)
        await stream.stop()
        self._streams.pop(stream_id, None)
        self.metrics.forget(stream_id)
        self._count_states()

    async def stop(self) -> None:
        """The service stops: every stream ends (their subscribers get their end)."""
        self._stopping = True
        await asyncio.gather(*(s.stop() for s in self._streams.values()))

    def _forget_old(self) -> None:
        ended = [k for k, s in self._streams.items() if s.ended]
        for stream_id in ended[:max(0, len(ended) - KEEP_ENDED)]:
            del self._streams[stream_id]
            self.metrics.forget(stream_id)

    def _count_states(self) -> None:
        self.metrics.count_states([s.state for s in self._streams.values()])
