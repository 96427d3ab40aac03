"""An HTTP MJPEG camera for the stream tests, served from a thread of the test's process.

``/stream.mjpg``: ``multipart/x-mixed-replace; boundary=frame``, one JPEG part (Content-Type,
Content-Length, and ``X-Frame-Index``: the scene frame it shows) per frame, paced in real time
at ``fps`` to any number of clients. The frame shown is the camera's clock's: frame
``floor(seconds since the first start x fps)``, the same for every client, and a client that
reads slowly skips frames, as from a camera. ``stop()`` and ``start()`` take the server down
and up on the same port (for reconnects); the clock goes on meanwhile.

Hostile modes, by path (``url_for(path)``), for a service that must end them in ``failed``:

- ``/endless-headers``: a 200 status line, then header lines forever (``?delay=S`` between
  lines; default 0: as fast as the client reads)
- ``/huge-frame``: a multipart stream whose first part announces Content-Length 2 GB, then
  sends bytes forever
- ``/huge-frame-unbounded``: a part with no Content-Length whose bytes never end (no
  boundary ever comes)
- ``/garbage``: random bytes forever under an MJPEG content type
- ``/stall``: the headers and one frame, then nothing, with the connection held open
- ``/not-video``: a 200 text/html page
- ``/redirect``: 302 to the ``redirect_to`` given at construction (404 without one)

Every mode ends promptly when the server stops: its loops watch a stop event and their sockets
are shut down under them, and ``stop()`` joins every connection's thread. ``connections``
counts requests per path (and ``accepted`` TCP connections), so that a test can assert that a
refused source was never fetched.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from tests.video import scene

BOUNDARY = "frame"
MJPEG_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
HUGE_LENGTH = 2 * 1024**3
_CHUNK = 64 * 1024
_JOIN_TIMEOUT_S = 10.0


class _Stopped(Exception):
    """The server is stopping: a handler's loop ends."""


class _Server(HTTPServer):
    """One thread per connection, each tracked (and its socket), so that ``close`` can end
    and join them all; socketserver's own mixin does not join daemon threads."""

    allow_reuse_address = True  # a restart rebinds the port at once
    daemon_threads = True

    def __init__(self, owner: MjpegServer, port: int) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.stopping.is_set():
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve_one, args=(request, client_address),
                                  name="mjpeg-connection", daemon=True)
        with self._lock:
            self.owner._count("", accepted=True)
            self._threads.add(thread)
            self._sockets.add(request)
        thread.start()

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a client gone mid-write, or the stop shutting the socket
            pass
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._sockets.discard(request)
                self._threads.discard(threading.current_thread())

    def close(self) -> list[threading.Thread]:
        """Stop accepting, end every connection, and join their threads; returns those still
        alive after the timeout (none, unless a handler is broken)."""
        self.stopping.set()
        self.shutdown()  # serve_forever returns: no new connections
        self.server_close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:  # unblocks a send to a client that stopped reading
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in threads if t.is_alive()]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # the body ends when the connection does

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet tests

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        owner = self.server.owner
        owner._count(url.path)
        routes: dict[str, Callable[[dict[str, str]], None]] = {
            "/stream.mjpg": self._stream,
            "/endless-headers": self._endless_headers,
            "/huge-frame": self._huge_frame,
            "/huge-frame-unbounded": self._huge_frame_unbounded,
            "/garbage": self._garbage,
            "/stall": self._stall,
            "/not-video": self._not_video,
            "/redirect": self._redirect,
        }
        route = routes.get(url.path)
        if route is None:
            self._plain(404, b"not found\n")
            return
        with contextlib.suppress(_Stopped):
            route(query)

    # --- helpers ---

    def _send(self, data: bytes) -> None:
        if self.server.stopping.is_set():
            raise _Stopped
        self.connection.sendall(data)

    def _wait(self, seconds: float) -> None:
        if self.server.stopping.wait(seconds):
            raise _Stopped

    def _hold(self) -> None:
        """Send nothing more, and keep the connection until the client closes it or the
        server stops (a client that gives up frees this thread)."""
        self.connection.setblocking(False)
        while True:
            self._wait(0.05)
            try:
                if not self.connection.recv(4096):
                    return  # the client closed
            except BlockingIOError:
                continue  # nothing to read: still there
            except OSError:
                return

    def _plain(self, status: int, body: bytes, content_type: str = "text/plain",
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _multipart_head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", MJPEG_TYPE)
        self.send_header("Cache-Control", "no-cache, no-store")
        self.send_header("Connection", "close")
        self.end_headers()

    def _part(self, jpeg: bytes, index: int) -> bytes:
        head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
                f"X-Frame-Index: {index}\r\n\r\n").encode()
        return head + jpeg + b"\r\n"

    # --- modes ---

    def _stream(self, _query: dict[str, str]) -> None:
        owner = self.server.owner
        self._multipart_head()
        last = -1
        while True:
            index, due = owner._next_frame(last)
            self._wait(max(0.0, due - time.monotonic()))
            self._send(self._part(owner.jpeg(index), index))
            owner._served()
            last = index

    def _endless_headers(self, query: dict[str, str]) -> None:
        delay = float(query.get("delay", "0"))
        self._send(b"HTTP/1.1 200 OK\r\n")
        line = 0
        while True:
            self._send(f"X-Header-{line}: {'x' * 100}\r\n".encode())
            line += 1
            if delay > 0:
                self._wait(delay)

    def _huge_frame(self, _query: dict[str, str]) -> None:
        self._multipart_head()
        self._send((f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {HUGE_LENGTH}\r\n\r\n").encode() + b"\xff\xd8")
        self._forever(b"\x00" * _CHUNK)

    def _huge_frame_unbounded(self, _query: dict[str, str]) -> None:
        self._multipart_head()
        self._send(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\n".encode() + b"\xff\xd8")
        self._forever(b"\x01" * _CHUNK)

    def _garbage(self, _query: dict[str, str]) -> None:
        self._multipart_head()
        rng = random.Random(27)
        while True:
            self._send(rng.randbytes(_CHUNK))

    def _stall(self, _query: dict[str, str]) -> None:
        self._multipart_head()
        self._send(self._part(self.server.owner.jpeg(0), 0))
        self.server.owner._served()
        self._hold()

    def _not_video(self, _query: dict[str, str]) -> None:
        self._plain(200, b"<!doctype html><title>Camera</title><p>Not a video.</p>\n",
                    "text/html; charset=utf-8")

    def _redirect(self, _query: dict[str, str]) -> None:
        target = self.server.owner.redirect_to
        if target is None:
            self._plain(404, b"no redirect target\n")
        else:
            self._plain(302, b"", extra={"Location": target})

    def _forever(self, chunk: bytes) -> None:
        while True:
            self._send(chunk)


class MjpegServer:
    """``with MjpegServer(fps=10) as camera: camera.url``: see the module's docstring."""

    def __init__(self, fps: float = 10.0, port: int = 0, redirect_to: str | None = None,
                 render: Callable[[int], np.ndarray] = scene.frame,
                 jpeg_quality: int = 90) -> None:
        self.fps = fps
        self.port = port  # 0: a free one, kept from the first start on
        self.redirect_to = redirect_to
        self.render = render
        self.jpeg_quality = jpeg_quality
        self.connections: Counter[str] = Counter()  # requests per path
        self.accepted = 0  # TCP connections, whatever they sent
        self.frames_served = 0  # JPEG parts written, over all clients
        self._lock = threading.Lock()
        self._jpegs: OrderedDict[int, bytes] = OrderedDict()
        self._epoch: float | None = None  # the camera's clock starts at the first start
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.url_for("/stream.mjpg")

    def url_for(self, path: str) -> str:
        return self.base_url + path

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        assert self._server is None, "already running"
        server = _Server(self, self.port)
        self.port = server.server_address[1]
        if self._epoch is None:
            self._epoch = time.monotonic()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, name="mjpeg-server",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the port and end every connection (each client sees its stream cut)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        left = server.close()
        thread.join(_JOIN_TIMEOUT_S)
        if left or thread.is_alive():
            raise RuntimeError(f"MJPEG server threads left behind: {left or [thread]}")

    def __enter__(self) -> MjpegServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def jpeg(self, index: int) -> bytes:
        """Scene frame ``index`` as a JPEG, encoded once (the last few are kept)."""
        with self._lock:
            cached = self._jpegs.get(index)
        if cached is not None:
            return cached
        ok, data = cv2.imencode(".jpg", self.render(index),
                                [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError(f"cannot encode frame {index}")
        jpeg = data.tobytes()
        with self._lock:
            self._jpegs[index] = jpeg
            while len(self._jpegs) > 16:
                self._jpegs.popitem(last=False)
        return jpeg

    def _next_frame(self, last: int) -> tuple[int, float]:
        """The frame to send after ``last`` and when: the camera's current frame, or the
        next one at its time when the current was sent already."""
        assert self._epoch is not None
        current = int((time.monotonic() - self._epoch) * self.fps)
        index = max(current, last + 1)
        return index, self._epoch + index / self.fps

    def _count(self, path: str, accepted: bool = False) -> None:
        with self._lock:
            if accepted:
                self.accepted += 1
            else:
                self.connections[path] += 1

    def _served(self) -> None:
        with self._lock:
            self.frames_served += 1
