"""uvicorn's httptools protocol with the limits a server facing the internet needs.

uvicorn (0.54, httptools) reads headers without a size limit or a deadline and accepts any
number of connections: 8 sockets sending 64 MiB of one header grew the process by 500 MB, and
1,030 sockets that sent nothing used up a 1,024 file-descriptor limit until the service stopped
answering. Here:

- a connection must deliver its request line and headers within ``header_timeout_s`` of
  connecting (or of its first byte after a keep-alive pause), else 408 and closed;
- request line and headers may hold ``max_header_bytes`` at most, else 431 and closed (checked
  on the raw bytes, before httptools buffers them);
- connections beyond ``max_connections`` are refused on arrival with a 503 and closed;
- a connection answered before its request body was all read (404, 413, a 503 at admission)
  says ``connection: close`` and ends in a lingering close, as nginx's: the response, then a
  FIN, then the rest of the body read and dropped until the client closes too, for
  ``linger_s`` and ``linger_max_bytes`` at most (UPLOAD_TIMEOUT_S, and the most a request may
  carry; it still counts as a connection). Closing at once with unread data makes the kernel
  send a reset: a client still sending its body fails its write, and an asyncio client (httpx)
  drops the response it had received with it. 48 keep-alive clients sending 363 KB bodies got
  18-23 % transport errors instead of their 503;
- a connection whose client does not read what was written (the write buffer stays above its
  high-water mark) for ``write_timeout_s`` is aborted, which frees the buffer: 38 sockets that
  asked for large rendered PNGs and never read held 2.3 GB;
- a response whose client falls behind (the write buffer passes its high-water mark) must be
  all sent within ``write_timeout_s`` + its size at ``min_send_rate`` of its start, else the
  connection is aborted: two clients reading renders at 100 KB/s held both render places for
  minutes, since each read reset ``write_timeout_s``. A rate rather than one total time, so
  that the allowance grows with the response (a 27 MB PNG over a 10 Mbit/s link needs 22 s)
  while a small one can't be held for long. A response of unknown size has the write timeout
  only.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.config import Settings

log = logging.getLogger("dfine.http")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_header_bytes: int
    max_connections: int
    write_timeout_s: float
    min_send_rate: float
    linger_s: float
    linger_max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        # A refused body is read and dropped for as long, and as much, as an accepted one
        # could be: UPLOAD_TIMEOUT_S, and what the largest request may carry.
        return cls(settings.header_timeout_s, settings.max_header_bytes,
                   settings.max_connections, settings.write_timeout_s,
                   settings.min_send_rate, settings.upload_timeout_s,
                   settings.max_batch_images * settings.max_upload_bytes)


def _refusal(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_TIMEOUT = _refusal(408, "Request Timeout", "request_timeout",
                    "the request line and headers took too long")
_TOO_BIG = _refusal(431, "Request Header Fields Too Large", "headers_too_large",
                    "the request line and headers are over the size limit")
_FULL = _refusal(503, "Service Unavailable", "overloaded", "too many connections")


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return None


class _ClosesByLingering(asyncio.Transport):
    """What a response's cycle sees as its transport once the connection must end after it
    while its request's body is still arriving: uvicorn's ``close()`` becomes ``linger()``."""

    def __init__(self, transport: asyncio.Transport, linger: Callable[[], None]) -> None:
        super().__init__()
        self._transport, self._linger = transport, linger

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._linger()


# The scope extension through which a request hears of its client's disconnect without a
# task of its own reading ``receive`` (one per request): a function taking a callback or None.
ON_DISCONNECT = "dfine.on_disconnect"


def guarded_protocol(limits: ConnectionLimits,
                     on_refusal: Callable[[str], None] | None = None) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that applies ``limits``.
    ``on_refusal(code)`` is told of every connection closed by them (for metrics)."""

    def refused(code: str) -> None:
        if on_refusal is not None:
            on_refusal(code)

    class GuardedProtocol(HttpToolsProtocol):
        _header_bytes = 0
        _in_headers = False
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None
        # The response being sent: when it started, and its headers (for its size).
        _response_started_at = 0.0
        _response_headers: Iterable[tuple[bytes, bytes]] | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _lingering = False
        _dropped_bytes = 0
        _linger_timer: asyncio.TimerHandle | None = None
        _disconnected: Callable[[], None] | None = None  # the request's, while it waits

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._refuse(_FULL, "overloaded")
                return
            self._start_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            for timer in (self._write_timer, self._send_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)
            if self._disconnected is not None:
                callback, self._disconnected = self._disconnected, None
                callback()

        # Slow readers: the write timeout, and the deadline of a response's whole send.

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(limits.write_timeout_s,
                                                         self._not_reading)
            if self._send_timer is None and self._response_headers is not None:
                self._start_send_deadline(self._response_headers)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _not_reading(self) -> None:
            self._write_timer = None
            log.info("client %s did not read its response for %g s: connection dropped",
                     self.client[0] if self.client else "-", limits.write_timeout_s)
            self.transport.abort()
            refused("client_closed")

        def _start_send_deadline(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
            # Set once, at the response's first fall behind, and not moved by later reads:
            # otherwise a client reading a little now and then would never reach it.
            size = _content_length(headers)
            if size is not None:
                deadline = (self._response_started_at + limits.write_timeout_s
                            + size / limits.min_send_rate)
                self._send_timer = self.loop.call_at(deadline, self._sending_too_slow, size)

        def _stop_send_deadline(self) -> None:
            self._response_headers = None
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _sending_too_slow(self, size: int) -> None:
            self._send_timer = None
            log.info("client %s read its response of %d bytes too slowly (under %d bytes/s "
                     "after %g s): connection dropped", self.client[0] if self.client else "-",
                     size, limits.min_send_rate, limits.write_timeout_s)
            self.transport.abort()
            refused("client_closed")

        # Request line and headers: their size and deadline.

        def _start_headers(self) -> None:
            self._in_headers, self._header_bytes = True, 0
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout_s,
                                                          self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._in_headers:
                self._refuse(_TIMEOUT, "request_timeout")

        def _refuse(self, response: bytes, code: str) -> None:
            self._in_headers = False
            self._stop_header_timer()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()
            refused(code)

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                self._drop(len(data))
                return
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            # Still in the headers after this chunk, and over the limit: httptools has kept
            # all of it so far, so stop here (a chunk that also held a body does not count,
            # since its headers completed).
            if self._in_headers and self._header_bytes > limits.max_header_bytes:
                self._refuse(_TOO_BIG, "headers_too_large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # a later request on a kept-alive connection
                self._start_headers()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._stop_header_timer()
            previous = self.cycle
            super().on_headers_complete()
            if self.cycle is not previous:  # not an upgrade
                self._watch_response(self.cycle)
                extensions: dict[str, Any] = self.cycle.scope.setdefault(
                    "extensions", {})
                extensions[ON_DISCONNECT] = self._on_disconnect

        # Disconnects, told to the request being answered (app.api.routes.until_disconnect).

        def _on_disconnect(self, callback: Callable[[], None] | None) -> None:
            """Call ``callback`` when the client goes (at once if it has gone); None: stop."""
            self._disconnected = callback
            if callback is not None and self.cycle is not None and self.cycle.disconnected:
                self._disconnected = None
                callback()

        # Each response: its start is seen, to know its size and whether the body is unread.

        def _watch_response(self, cycle: RequestResponseCycle) -> None:
            send = cycle.send

            def send_watched(message: Any) -> Awaitable[None]:
                # Not a coroutine of its own: uvicorn's is awaited directly (a frame less on
                # every send).
                if message["type"] == "http.response.start":
                    self._response_starts(cycle, message.get("headers", ()))
                return send(message)

            cycle.send = send_watched  # type: ignore[method-assign,assignment]

        def _response_starts(self, cycle: RequestResponseCycle,
                             headers: Iterable[tuple[bytes, bytes]]) -> None:
            self._response_started_at, self._response_headers = self.loop.time(), headers
            if cycle.more_body:
                # Answered before its body was all read: uvicorn writes `connection: close`
                # for a cycle that is not kept alive, and closes it after the response (here
                # through a transport whose close lingers).
                cycle.keep_alive = False
                cycle.transport = _ClosesByLingering(self.transport, self._linger)

        def on_response_complete(self) -> None:
            self._stop_send_deadline()
            if self._lingering:  # the connection ends with this response
                self.pipeline.clear()
            super().on_response_complete()
            if self._lingering:  # no keep-alive wait either: the linger has its own bound
                self._unset_keepalive_if_required()

        # Lingering close.

        def _linger(self) -> None:
            if self._lingering or self.transport.is_closing():
                return
            if not self.transport.can_write_eof():  # TLS: no half-close
                self.transport.close()
                return
            self._lingering = True
            self.transport.write_eof()  # the FIN follows the response once it is sent
            self.flow.resume_reading()
            self._linger_timer = self.loop.call_later(limits.linger_s, self._linger_over)
            # The client's EOF ends it sooner: eof_received closes the transport.

        def _drop(self, size: int) -> None:
            self._dropped_bytes += size
            if self._dropped_bytes > limits.linger_max_bytes:
                self.transport.abort()

        def _linger_over(self) -> None:
            self._linger_timer = None
            self.transport.abort()

    return GuardedProtocol


def raise_open_file_limit(connections: int) -> int:
    """Raise this process's soft open-file limit toward its hard limit, to hold ``connections``
    sockets and some files beside; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < wanted:
        log.warning("the open-file limit (%d) is below the connections allowed (HTTP and "
                    "gRPC) + 256 (%d): raise the hard limit (ulimit -Hn) or lower "
                    "MAX_CONNECTIONS or GRPC_MAX_CONNECTIONS", soft, wanted)
    return soft
