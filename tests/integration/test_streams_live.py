"""Live MJPEG cameras over HTTP (the bench's own paced cameras, app.bench.streams): a source
faster than the engine keeps its lag bounded and counts its drops, the preview shows boxes, and
a refused source is never contacted."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from app.bench.streams import cameras, moving_shapes
from tests.helpers import Server, metric, run_server, wait_until
from tests.integration.stream_client import create, events, frame_events, status


@pytest.fixture(scope="module")
def camera_url() -> Iterator[str]:
    with cameras(2, 30.0, moving_shapes(30)) as url:  # 30 fps: faster than the CPU engine
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("live"),
                    env={"DFINE_STREAM_SOURCES": "127.0.0.1/32"}) as running:
        yield running


def test_a_live_source_faster_than_the_engine_keeps_its_lag_bounded(server: Server,
                                                                     camera_url: str) -> None:
    made = [create(server.url, {"source": f"{camera_url}/cam/{k}"}) for k in range(2)]
    for stream in made:
        assert stream["source"].startswith("http://127.0.0.1:")
    got = events(server.url, made[0]["id"], timeout_s=120, after=None, frames=40)
    frames = frame_events(got)
    assert len(frames) == 40
    # The newest frame wins: frames are skipped between events, counted in each event.
    assert any(f["dropped"] > 0 for f in frames)
    numbers = [f["frame"] for f in frames]
    assert numbers == sorted(numbers)
    # Each event counts the frames dropped between it and the one before.
    gaps = [b - a - 1 for a, b in itertools.pairwise(numbers)]
    assert [f["dropped"] for f in frames[1:]] == gaps
    # Lag stays near what a frame's own run takes, however long the stream runs: no queue.
    late = [f["lag_s"] for f in frames[20:]]
    assert max(late) < 5.0, late
    seen = status(server.url, made[0]["id"])
    assert seen["state"] == "running" and seen["kind"] == "live"
    assert seen["frames_dropped"] > 0 and seen["fps_in"] > seen["fps_out"] > 0
    assert metric(server.url, f'dfine_stream_frames_dropped_total{{stream="{made[0]["id"]}",'
                              'reason="behind"}') > 0
    assert metric(server.url, f'dfine_stream_up{{stream="{made[0]["id"]}"}}') == 1
    for stream in made:
        assert httpx.delete(f"{server.url}/streams/{stream['id']}", timeout=30).status_code == 204
    exposition = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert f'dfine_stream_up{{stream="{made[0]["id"]}"}}' not in exposition  # gone with it


def test_the_preview_shows_the_frames_with_their_boxes(server: Server, camera_url: str) -> None:
    stream = create(server.url, {"source": f"{camera_url}/cam/0"})
    with httpx.stream("GET", f"{server.url}/streams/{stream['id']}/preview",
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
        data = b""
        for chunk in response.iter_bytes():
            data += chunk
            if data.count(b"--frame") >= 3:
                break
    part = data.split(b"--frame")[1]
    jpeg = part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (480, 640, 3)
    httpx.delete(f"{server.url}/streams/{stream['id']}", timeout=30)


class Listener:
    """A TCP port that counts who connects (to show a refused source was never contacted)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()


def test_a_source_outside_the_allowed_list_is_refused_and_never_contacted(
        tmp_path: Path) -> None:
    listener = Listener()
    try:
        with run_server(tmp_path, env={"DFINE_STREAM_SOURCES": "rtsp://127.0.0.1:1/allowed,"
                                                               "10.99.0.0/16"}) as server:
            for source in (f"http://127.0.0.1:{listener.port}/cam",
                           f"rtsp://127.0.0.1:{listener.port}/allowed",
                           f"rtsp://127.0.0.1:1@127.0.0.1:{listener.port}/allowed",
                           f"http://localhost:{listener.port}/"):
                answer = httpx.post(f"{server.url}/streams", json={"source": source}, timeout=30)
                assert answer.status_code == 403, answer.text
                assert answer.json()["error"]["code"] == "source_refused"
            # Allowed but unreachable: it fails with its reason, within the open timeout.
            allowed = create(server.url, {"source": "rtsp://127.0.0.1:1/allowed"})
            failed = wait_until(
                lambda: (s := status(server.url, allowed["id"]))["state"] == "failed" and s,
                60, "the unreachable source to fail")
            assert failed["reason"]
            assert httpx.post(f"{server.url}/detect", content=b"x", timeout=30).status_code \
                in (400, 415)  # and the service goes on
        assert listener.accepted == 0
    finally:
        listener.socket.close()
