"""A camera over RTSP (GStreamer's RTSP server, started by the test, playing the scene of moving
shapes in real time): detections with track ids that follow the known paths, a camera killed
and restarted mid-stream (reconnecting, then running again), and several cameras at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, box_iou, metric, run_server, wait_until
from tests.integration.stream_client import create, events, frame_events, status
from tests.video import scene
from tests.video.rtsp_server import RtspServer

FPS = 10.0
FRAMES = scene.PERIOD  # a whole period of the scene: the server's loop is seamless (a shorter
# file would jump the shapes back to their start at each loop, and a tracker rightly gives
# them new ids)


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RtspServer]:
    folder = tmp_path_factory.mktemp("rtsp")
    scene.write_h264(folder / "scene.mkv", FRAMES, FPS)
    with RtspServer(folder / "scene.mkv") as rtsp:
        yield rtsp


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("server"), env={
            "DFINE_STREAM_SOURCES": "127.0.0.1/32", "DFINE_STREAM_READ_TIMEOUT_S": "3"}
                    ) as running:
        yield running


def matched_paths(body: dict[str, Any], k: int) -> dict[int, int | None]:
    """For each path of the scene at its frame ``k``: the track id of the detection on it."""
    found: dict[int, int | None] = {}
    for path, (class_id, box) in enumerate(scene.truth(k)):
        for det in body["detections"]:
            b = det["box"]
            if det["class_id"] == class_id and box_iou(
                    (b["x1"], b["y1"], b["x2"], b["y2"]), box) >= 0.5:
                found[path] = det["track_id"]
    return found


def source_frame(body: dict[str, Any]) -> int:
    """The scene's frame an event shows: the server loops the file, timestamps go on."""
    return round(body["timestamp_s"] * FPS) % FRAMES


def test_a_camera_is_detected_with_track_ids_along_the_known_paths(
        server: Server, camera: RtspServer) -> None:
    # 2 fps: a rate the engine keeps up with on a loaded machine too (ByteTrack counts frames,
    # not seconds: frames dropped in a row would stretch its motion model past the shapes).
    stream = create(server.url, {"source": camera.url, "fps": 2})
    assert stream["kind"] == "live" and stream["source"] == camera.url
    frames = frame_events(events(server.url, stream["id"], timeout_s=120, after=None,
                                 frames=30))
    ids: dict[int, set[int]] = {}
    found = 0
    for body in frames:
        assert (body["width"], body["height"]) == (scene.WIDTH, scene.HEIGHT)
        for path, track in matched_paths(body, source_frame(body)).items():
            found += 1
            if track is not None:
                ids.setdefault(path, set()).add(track)
    assert found >= 0.9 * 30 * len(scene.truth(0)), found  # the shapes are where truth says
    assert len(ids) == len(scene.truth(0))
    for path, tracks in ids.items():
        assert len(tracks) <= 2, f"path {path} took ids {tracks}"  # at most one switch
    assert len(set().union(*ids.values())) == sum(len(t) for t in ids.values())  # none shared
    seen = status(server.url, stream["id"])
    assert seen["state"] == "running" and 1 < seen["fps_out"] <= 3


def test_a_camera_killed_and_restarted_mid_stream_is_reconnected(
        server: Server, camera: RtspServer) -> None:
    stream = create(server.url, {"source": camera.url, "fps": 5, "tracking": False})
    wait_until(lambda: status(server.url, stream["id"])["frames_processed"] >= 5, 60,
               "frames before the kill")
    camera.kill()
    lost = wait_until(lambda: (s := status(server.url, stream["id"]))["state"] == "reconnecting"
                      and s, 60, "the stream to see its camera gone")
    assert lost["reason"]
    assert metric(server.url, f'dfine_stream_up{{stream="{stream["id"]}"}}') == 0
    camera.start()
    back = wait_until(lambda: (s := status(server.url, stream["id"]))["state"] == "running"
                      and s["frames_processed"] > lost["frames_processed"] and s, 90,
                      "the stream to run again")
    assert back["reconnects"] >= 1
    assert metric(server.url, f'dfine_stream_reconnects_total{{stream="{stream["id"]}"}}') >= 1
    assert metric(server.url, f'dfine_stream_up{{stream="{stream["id"]}"}}') == 1


def test_four_cameras_share_engine_runs(tmp_path: Path, camera: RtspServer) -> None:
    with run_server(tmp_path, env={"DFINE_STREAM_SOURCES": "127.0.0.1/32",
                                   "DFINE_MAX_BATCH_SIZE": "8", "DFINE_MAX_DELAY_MS": "50"}
                    ) as server:
        made = [create(server.url, {"source": camera.url, "tracking": False})
                for _ in range(4)]
        for stream in made:
            wait_until(lambda s=stream: status(server.url, s["id"])["frames_processed"] >= 10,
                       120, "each camera's frames")
        runs = metric(server.url, "dfine_batch_size_count")
        images = metric(server.url, "dfine_batch_size_sum")
        assert images / runs > 1.2, f"{images} images in {runs} runs"
