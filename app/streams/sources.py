"""Reading a source's frames, in a thread of its own: RTSP and files through FFmpeg (PyAV),
HTTP through a client of our own (no redirect followed, every read bounded), its body either an
MJPEG stream (multipart parts, each a JPEG kept encoded until it is processed) or a video
container handed to FFmpeg.

A reader delivers ``Frame``s to a callback until the source ends (``read`` returns), breaks
(``SourceError``), or is stopped. What a reader holds is bounded: FFmpeg's demuxer and decoder,
one frame being delivered, and for HTTP at most STREAM_MAX_FRAME_BYTES of the body at a time.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import unquote, urlsplit

import numpy as np
import numpy.typing as npt

from app.config import Settings
from app.errors import ServiceError
from app.imaging import check_header
from app.streams.policy import Source

if TYPE_CHECKING:
    import av

# PyAV and h11 are imported where a source needs them: a service that watches no video
# loads neither (the GPU check's kit carries neither).
PixelFormat = Literal["rgb24", "bgr24"]
# Demuxers FFmpeg may pick: none that opens other files or URLs named in the data (HLS, DASH,
# concat, SDP, image2), so that a source cannot lead FFmpeg anywhere STREAM_SOURCES does not.
FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mjpeg,mpjpeg,h264,hevc,flv,ivf,"
           "rtsp,mpeg,m4v,asf,ogg")
PROTOCOLS = {"rtsp": "rtsp,rtsps,rtp,srtp,udp,tcp,tls", "file": "file"}
MAX_PART_HEADER_BYTES = 8192
MAX_RESPONSE_HEADER_BYTES = 65536
PROBE_BYTES = 5_000_000  # FFmpeg reads this much at most to find a container's streams
READ_CHUNK = 65536


class SourceError(Exception):
    """The source cannot be read (any more): the reason, safe to show."""


@dataclass
class Frame:
    """One frame of a source: decoded by FFmpeg (``video``), or an MJPEG part still encoded
    (``jpeg``: decoded only if processed, by the same path as /detect's uploads)."""

    index: int  # counted from 0 over the stream's life
    timestamp_s: float | None  # the source's own time (presentation time), when it has one
    received: float  # time.perf_counter() when it came out of the decoder or the socket
    width: int
    height: int
    jpeg: bytes | None = None
    video: av.VideoFrame | None = None  # PyAV's
    skipped: int = 0  # the stream's frames skipped by its fps cap before this one

    def pixels(self, pixel_format: PixelFormat) -> npt.NDArray[np.uint8]:
        assert self.video is not None
        return cast(npt.NDArray[np.uint8], self.video.to_ndarray(format=pixel_format))


Deliver = Callable[[Frame], bool]  # False: stop reading


class Reader:
    """Reads one connection to a source; ``stop`` from any thread ends it at its next frame or
    read (a blocked socket read at once; FFmpeg within its read timeout)."""

    def __init__(self, source: Source, settings: Settings, first_index: int = 0) -> None:
        self.source, self.settings = source, settings
        self.next_index = first_index
        self.finite: bool | None = None  # known once open: a file's end is the stream's end
        self.frame_rate: float | None = None  # frames a second, where the source says
        self._stopped = threading.Event()
        self._socket: socket.socket | None = None

    def stop(self) -> None:
        self._stopped.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def read(self, deliver: Deliver) -> None:
        """Deliver frames until the source ends; SourceError when it cannot be read."""
        try:
            if self.source.kind == "http":
                self._read_http(deliver)
            else:
                self._read_av(self.source.target, deliver, PROTOCOLS[self.source.kind])
        except SourceError:
            if not self.stopped:
                raise
        except ImportError as exc:
            raise SourceError(f"this service cannot read {self.source.kind} sources: "
                              f"{exc.name or exc} is not installed") from exc
        except Exception as exc:
            if not isinstance(exc, _source_errors()):
                raise
            if not self.stopped:
                # FFmpeg's errors quote the URL it was given, credentials and all.
                reason = _reason(exc).replace(self.source.target, self.source.shown)
                raise SourceError(reason) from exc

    # --- FFmpeg ---------------------------------------------------------------------------

    def _read_av(self, target: Any, deliver: Deliver, protocols: str | None) -> None:
        import av

        settings = self.settings
        options = {"format_whitelist": FORMATS}
        if protocols is not None:
            options["protocol_whitelist"] = protocols
        if self.source.kind == "rtsp":
            # A camera's SDP names its codec: a short probe starts at the next keyframe
            # instead of after FFmpeg's default 5 s of analysis (2.8 s here, then a burst).
            options.update(rtsp_transport="tcp", allowed_media_types="video",
                           fflags="nobuffer", analyzeduration="500000", probesize="500000")
        container = av.open(target, options=options, timeout=(
            settings.stream_open_timeout_s, settings.stream_read_timeout_s))
        try:
            if not container.streams.video:
                raise SourceError("the source has no video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            # The decoder refuses a larger frame before allocating it (a stream may change size
            # midway: the first frame's size, checked below, says nothing of later ones).
            stream.codec_context.options = {"max_pixels": str(settings.stream_max_pixels)}
            rate = stream.average_rate or stream.guessed_rate
            self.frame_rate = float(rate) if rate else None
            self._check_size(stream.codec_context.width, stream.codec_context.height)
            duration = container.duration
            self.finite = self.source.kind == "file" or (
                duration is not None and duration > 0 and container.format.name != "mpjpeg")
            for frame in container.decode(stream):
                if self.stopped:
                    return
                self._check_size(frame.width, frame.height)
                if not deliver(Frame(self._take_index(), frame.time, time.perf_counter(),
                                     frame.width, frame.height, video=frame)):
                    return
        finally:
            container.close()

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.settings.stream_max_pixels:
            raise SourceError(f"the source's frames are {width}x{height}; STREAM_MAX_PIXELS is "
                              f"{self.settings.stream_max_pixels}")

    def _take_index(self) -> int:
        index, self.next_index = self.next_index, self.next_index + 1
        return index

    # --- HTTP -----------------------------------------------------------------------------

    def _read_http(self, deliver: Deliver) -> None:
        body = HttpBody(self.source, self.settings, self)
        try:
            kind, _, params = body.content_type.partition(";")
            if kind.strip().lower() == "multipart/x-mixed-replace":
                self.finite = False
                boundary = _parameter(params, "boundary")
                if not boundary:
                    raise SourceError("a multipart/x-mixed-replace answer without a boundary")
                self._read_mjpeg(body, boundary, deliver)
            else:
                # Any other body is a video container for FFmpeg, read as it arrives; one
                # frame may cost at most STREAM_MAX_FRAME_BYTES of it (the first, the probe's
                # bytes more).
                body.budget = PROBE_BYTES + self.settings.stream_max_frame_bytes
                self._read_av(body, lambda frame: body.spent() and deliver(frame), None)
        finally:
            body.close()

    def _read_mjpeg(self, body: HttpBody, boundary: str, deliver: Deliver) -> None:
        limit = self.settings.stream_max_frame_bytes
        for part in _mjpeg_parts(body, boundary.encode("latin-1"), limit):
            if self.stopped:
                return
            try:
                header = check_header(part, self.settings.stream_max_pixels)
            except ServiceError as exc:
                raise SourceError(f"an MJPEG part: {exc.message}") from None
            width, height = header.size or (0, 0)
            if not deliver(Frame(self._take_index(), None, time.perf_counter(), width, height,
                                 jpeg=part)):
                return


class HttpBody:
    """A GET, on a connection of our own: no redirect is followed (the policy checked this
    URL, not another), headers and reads are bounded, and the body is read as it comes."""

    def __init__(self, source: Source, settings: Settings, reader: Reader) -> None:
        import h11

        url = urlsplit(source.target)
        self.timeout_s = settings.stream_read_timeout_s
        self.budget = 0  # > 0: bytes that may be read before ``spent`` is called again
        self.frame_budget = settings.stream_max_frame_bytes
        self._read_since = 0
        self._buffer = bytearray()
        self._ended = False
        port = url.port or (443 if url.scheme == "https" else 80)
        sock = socket.create_connection((url.hostname or "", port),
                                        timeout=settings.stream_open_timeout_s)
        if url.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=source.host)
        reader._socket = self._sock = sock
        if reader.stopped:
            raise SourceError("stopped")
        self._connection = h11.Connection(h11.CLIENT,
                                          max_incomplete_event_size=MAX_RESPONSE_HEADER_BYTES)
        host = source.host + (f":{url.port}" if url.port else "")
        headers = [("Host", host), ("User-Agent", "dfine-serve"), ("Accept", "*/*")]
        if url.username is not None:
            token = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
            headers.append(("Authorization", "Basic " + base64.b64encode(token).decode()))
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        sock.sendall(self._connection.send(h11.Request(method="GET", target=target,
                                                       headers=headers)))
        sock.sendall(self._connection.send(h11.EndOfMessage()))
        deadline = time.monotonic() + settings.stream_open_timeout_s
        response = self._next_event(deadline)
        if not isinstance(response, h11.Response):
            raise SourceError("the source closed the connection without answering")
        if 300 <= response.status_code < 400:
            raise SourceError(f"the source redirects (HTTP {response.status_code}); redirects "
                              "are not followed: add the final URL to STREAM_SOURCES and use it")
        if response.status_code != 200:
            raise SourceError(f"the source answered HTTP {response.status_code}")
        self.content_type = dict(response.headers).get(b"content-type", b"").decode("latin-1")
        sock.settimeout(self.timeout_s)

    def _next_event(self, deadline: float | None = None) -> Any:
        import h11

        while True:
            event = self._connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SourceError("the source did not answer in time")
                self._sock.settimeout(left)
            try:
                data = self._sock.recv(READ_CHUNK)
            except TimeoutError:
                raise SourceError("the source went silent") from None
            self._connection.receive_data(data)

    def read(self, size: int = -1) -> bytes:
        """Body bytes (b"" at its end), for FFmpeg and the MJPEG parser."""
        import h11

        while not self._buffer and not self._ended:
            event = self._next_event()
            if isinstance(event, h11.Data):
                self._buffer += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self._ended = True
        size = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._read_since += len(chunk)
        if self.budget and self._read_since > self.budget:
            raise SourceError(f"no frame in {self._read_since} bytes of the source "
                              "(STREAM_MAX_FRAME_BYTES)")
        return chunk

    def spent(self) -> bool:
        """A frame came out: the next one may read a frame's worth (no more probe)."""
        self._read_since = 0
        self.budget = min(self.budget, self.frame_budget)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def _mjpeg_parts(body: HttpBody, boundary: bytes, limit: int) -> Iterator[bytes]:
    """The parts of a multipart/x-mixed-replace body: each part's headers at most
    MAX_PART_HEADER_BYTES, its data at most ``limit`` bytes (with a Content-Length, refused
    before it is read; without, once that much has come without the next boundary)."""
    marker = b"--" + boundary
    buffer = bytearray()

    def fill() -> None:
        chunk = body.read(READ_CHUNK)
        if not chunk:
            raise SourceError("the source's stream ended")
        buffer.extend(chunk)

    while True:
        # The part's headers: after the boundary line, up to an empty line.
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_PART_HEADER_BYTES + len(marker) + 4:
                raise SourceError("an MJPEG part's headers are too long, or not a part at all")
            fill()
        head = bytes(buffer[:end])
        del buffer[:end + 4]
        if marker not in head:
            raise SourceError("not an MJPEG stream: a part without its boundary")
        length = None
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise SourceError("an MJPEG part has a bad Content-Length") from None
        if length is not None:
            if not 0 < length <= limit:
                raise SourceError(f"an MJPEG part of {length} bytes (STREAM_MAX_FRAME_BYTES "
                                  f"is {limit})")
            while len(buffer) < length:
                fill()
            part = bytes(buffer[:length])
            del buffer[:length]
        else:
            while (at := buffer.find(marker)) < 0:
                if len(buffer) > limit + len(marker):
                    raise SourceError(f"an MJPEG part over {limit} bytes "
                                      "(STREAM_MAX_FRAME_BYTES)")
                fill()
            part = bytes(buffer[:at]).rstrip(b"\r\n")
            del buffer[:at]
        if part:
            yield part


def _parameter(params: str, name: str) -> str:
    for item in params.split(";"):
        key, _, value = item.strip().partition("=")
        if key.strip().lower() == name:
            value = value.strip().strip('"')
            return value[2:] if value.startswith("--") else value
    return ""


def _source_errors() -> tuple[type[BaseException], ...]:
    """What a broken source raises: the socket's errors, and those of PyAV and h11 that are
    loaded (one that is not loaded raised nothing)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module, name in (("av", "FFmpegError"), ("h11", "ProtocolError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the source did not answer in time"
    text = str(exc).strip() or type(exc).__name__
    return text[:300]
