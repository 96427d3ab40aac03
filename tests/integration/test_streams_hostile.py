"""Hostile and broken sources: each costs a bounded amount and ends in `failed` (or, once it
ran, `reconnecting`) with its reason; the service goes on serving. The sources are a socket
server of the test's own that misbehaves on purpose (the fault injected), by path."""

from __future__ import annotations

import io
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import httpx
import numpy as np
import pytest

from tests.helpers import Server, encode, run_server, wait_until
from tests.integration.stream_client import create, status
from tests.video import scene

JPEG = encode(scene.frame(0))
PART = b"--fr\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(JPEG) + JPEG \
    + b"\r\n"
MJPEG_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=fr\r\n"
              b"\r\n")


class HostileSource:
    """Serves on loopback; what each path does is in ``_serve``. Counts connections."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            request = connection.recv(65536)
            path = request.split(b" ")[1].decode()
            if path == "/endless-headers":
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.stopping.is_set():
                    connection.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
            elif path == "/huge-part":
                connection.sendall(MJPEG_HEAD + b"--fr\r\nContent-Length: 2000000000\r\n\r\n")
                while not self.stopping.is_set():
                    connection.sendall(b"\0" * 65536)
            elif path == "/no-boundary":
                connection.sendall(MJPEG_HEAD + b"--fr\r\nContent-Type: image/jpeg\r\n\r\n")
                while not self.stopping.is_set():
                    connection.sendall(b"\0" * 65536)
            elif path == "/garbage":
                rng = np.random.default_rng(0)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n\r\n")
                while not self.stopping.is_set():
                    connection.sendall(rng.bytes(65536))
                    time.sleep(0.01)
            elif path == "/silent":
                self.stopping.wait(60)
            elif path == "/trickle":  # runs, then sends a byte every second, never a frame
                connection.sendall(MJPEG_HEAD + PART * 3
                                   + b"--fr\r\nContent-Length: 4000000\r\n\r\n")
                while not self.stopping.wait(1):
                    connection.sendall(b"x")
            elif path == "/huge-jpeg":
                big = encode(np.zeros((1200, 2000, 3), np.uint8))
                connection.sendall(MJPEG_HEAD + b"--fr\r\nContent-Length: %d\r\n\r\n"
                                   % len(big) + big + b"\r\n")
                self.stopping.wait(60)
            elif path == "/redirect":
                connection.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\n"
                                   b"Content-Length: 0\r\n\r\n")
            elif path == "/html":
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                                   b"Content-Length: 13\r\n\r\n<html></html>")
        except OSError:
            pass
        finally:
            connection.close()

    def close(self) -> None:
        self.stopping.set()
        self.socket.close()


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileSource]:
    source = HostileSource()
    yield source
    source.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    videos = tmp_path_factory.mktemp("videos")
    write_growing_video(videos / "grows.h264")
    with run_server(tmp_path_factory.mktemp("hostile"), env={
            "DFINE_STREAM_SOURCES": "127.0.0.0/8", "DFINE_VIDEO_DIR": str(videos),
            "DFINE_STREAM_OPEN_TIMEOUT_S": "4", "DFINE_STREAM_READ_TIMEOUT_S": "3",
            "DFINE_STREAM_MAX_PIXELS": str(1920 * 1080)}) as running:
        yield running


def write_growing_video(path: Path) -> None:
    """20 frames of 640x480, then frames of 4000x4000 (over STREAM_MAX_PIXELS), as H.264."""
    with path.open("wb") as out:
        for width, height, count in ((640, 480, 20), (4000, 4000, 2)):
            buffer = io.BytesIO()
            with av.open(buffer, mode="w", format="h264") as container:
                stream = container.add_stream("libx264", rate=10)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.options = {"preset": "ultrafast", "bf": "0"}
                for k in range(count):
                    image = scene.frame(k) if width == 640 else cv2.resize(
                        scene.frame(k), (width, height))
                    picture = av.VideoFrame.from_ndarray(image, format="bgr24")
                    picture.pts = k
                    container.mux(stream.encode(picture))
                container.mux(stream.encode(None))
            out.write(buffer.getvalue())


@pytest.mark.parametrize(("path", "reason"), [
    ("/endless-headers", ""), ("/huge-part", "2000000000 bytes"),
    ("/no-boundary", "STREAM_MAX_FRAME_BYTES"), ("/garbage", ""),
    ("/silent", ""), ("/huge-jpeg", "2000x1200"), ("/redirect", "redirect"),
    ("/html", ""),
])
def test_a_hostile_source_fails_with_its_reason_and_the_service_goes_on(
        server: Server, hostile: HostileSource, path: str, reason: str) -> None:
    stream = create(server.url, {"source": hostile.url + path})
    started = time.monotonic()
    failed = wait_until(lambda: (s := status(server.url, stream["id"]))["state"] == "failed"
                        and s, 60, f"{path} to fail")
    assert time.monotonic() - started < 30
    assert failed["reason"] and reason in failed["reason"], failed["reason"]
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
    answer = httpx.post(f"{server.url}/detect", content=JPEG,
                        headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert answer.status_code == 200


def test_a_source_that_stalls_while_running_is_lost_and_reconnected(
        server: Server, hostile: HostileSource) -> None:
    stream = create(server.url, {"source": hostile.url + "/trickle"})
    wait_until(lambda: status(server.url, stream["id"])["frames_processed"] >= 3, 60,
               "its three frames")
    lost = wait_until(lambda: (s := status(server.url, stream["id"]))["state"] in
                      ("reconnecting", "connecting") and s["reconnects"] >= 1 and s, 60,
                      "the stalled source to be reconnected")
    assert lost["frames_in"] >= 3
    httpx.delete(f"{server.url}/streams/{stream['id']}", timeout=30)


def test_a_file_whose_frames_grow_past_the_limit_fails_and_is_not_read_again(
        server: Server) -> None:
    stream = create(server.url, {"source": "grows.h264", "tracking": False})
    failed = wait_until(lambda: (s := status(server.url, stream["id"]))["state"] in
                        ("failed", "ended") and s, 120, "the file to stop")
    assert failed["state"] == "failed", failed
    assert failed["frames_processed"] == 20 and failed["reconnects"] == 0


def test_a_sources_credentials_never_show(server: Server) -> None:
    stream = create(server.url, {"source": "rtsp://admin:s3cret@127.0.0.1:1/live?token=abc"})
    assert "s3cret" not in str(stream) and "abc" not in stream["source"]
    failed = wait_until(lambda: (s := status(server.url, stream["id"]))["state"] == "failed"
                        and s, 60, "the unreachable camera to fail")
    assert "s3cret" not in failed["reason"] and "token" not in failed["reason"]
    assert "s3cret" not in server.log()


def test_sigterm_ends_open_event_readers_and_the_service_exits(tmp_path: Path,
                                                               hostile: HostileSource) -> None:
    with run_server(tmp_path, env={"DFINE_STREAM_SOURCES": "127.0.0.0/8"}) as server:
        stream = create(server.url, {"source": hostile.url + "/trickle"})
        lines: list[str] = []

        def read() -> None:
            with httpx.stream("GET", f"{server.url}/streams/{stream['id']}/events",
                              timeout=120) as response:
                lines.extend(response.iter_lines())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_until(lambda: any(line.startswith("event:") for line in lines), 30,
                   "the events to start")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        reader.join(30)
        assert "event: end" in lines
