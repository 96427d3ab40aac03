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
- a connection answered before its request body was all read is closed;
- a connection whose client does not read what was written (the write buffer stays above its
  high-water mark) for ``write_timeout_s`` is aborted, which frees the buffer: 38 sockets that
  asked for large rendered PNGs and never read held 2.3 GB.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("dfine.http")

@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_header_bytes: int
    max_connections: int
    write_timeout_s: float


def _refusal(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_TIMEOUT = _refusal(408, "Request Timeout", "request_timeout",
                    "the request line and headers took too long")
_TOO_BIG = _refusal(431, "Request Header Fields Too Large", "headers_too_large",
                    "the request line and headers are over the size limit")
_FULL = _refusal(503, "Service Unavailable", "overloaded", "too many connections")


def guarded_protocol(limits: ConnectionLimits,
                     on_refusal: Callable[[str], None] | None = None) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` that applies ``limits``.
    ``on_refusal(code)`` is told of every connection closed by them (for metrics)."""

    class GuardedProtocol(HttpToolsProtocol):
        _header_bytes = 0
        _in_headers = False
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._refuse(_FULL, "overloaded")
                return
            self._start_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            if self._write_timer is not None:
                self._write_timer.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(limits.write_timeout_s,
                                                         self._not_reading)

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
            if on_refusal is not None:
                on_refusal("client_closed")

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
            if on_refusal is not None:
                on_refusal(code)

        def data_received(self, data: bytes) -> None:
            if self._in_headers:
                self._header_bytes += len(data)
            super().data_received(data)
            # Still in the headers after this chunk, and over the limit: httptools has kept
            # all of it so far, so stop here (a chunk that also held a body does not count,
            # since its headers completed).
            if self._in_headers and self._header_bytes > limits.max_header_bytes:
                self._refuse(_TOO_BIG, "headers_too_large")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Answered before its body was all read (408, 413, a 503 at the door): the rest
            # would only be read and dropped, and a drip-feeding client would keep the
            # connection for ever. Close it instead.
            if self.cycle is not None and self.cycle.more_body:
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # a later request on a kept-alive connection
                self._start_headers()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._stop_header_timer()
            super().on_headers_complete()

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
        log.warning("the open-file limit (%d) is below MAX_CONNECTIONS + 256 (%d): raise the "
                    "hard limit (ulimit -Hn) or lower MAX_CONNECTIONS", soft, wanted)
    return soft
