"""Video files through the service (a real server, the shipped model, files written by
OpenCV): every frame detected as /detect detects it, track ids that follow the scene's known
paths, the fps cap, several streams sharing engine runs, the limits, and clients' frames over
a WebSocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.helpers import (
    Server,
    assert_same_detections,
    encode,
    metric,
    run_server,
    wait_until,
)
from tests.integration.stream_client import (
    create,
    events,
    frame_events,
    status,
    track_ids_by_path,
    wait_for_state,
)
from tests.video import scene

FRAMES = 40
FPS = 10.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    scene.write_video(folder / "scene.mp4", FRAMES, FPS)
    return folder


@pytest.fixture(scope="module")
def server(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("server"), env={
            "DFINE_VIDEO_DIR": str(videos), "DFINE_MAX_STREAMS": "4"}) as running:
        yield running


def decoded_frames(path: Path) -> list[Any]:
    """The file's frames as FFmpeg decodes them (RGB), as the service's reader does."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def detect(url: str, rgb: Any, **params: Any) -> list[dict[str, Any]]:
    png = encode(rgb[..., ::-1], ".png")  # lossless: the same pixels
    answer = httpx.post(f"{url}/detect", content=png, params=params,
                        headers={"Content-Type": "image/png"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["detections"])


def without_tracks(detections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in d.items() if k != "track_id"} for d in detections]


def test_a_file_is_detected_frame_by_frame_as_detect_detects_each_frame(
        server: Server, videos: Path) -> None:
    stream = create(server.url, {"source": "scene.mp4", "tracking": False})
    assert stream["kind"] == "file" and stream["source"] == "scene.mp4"
    got = events(server.url, stream["id"], timeout_s=120)
    frames = frame_events(got)
    assert [f["frame"] for f in frames] == list(range(FRAMES))  # every frame, in order
    assert got[-1][0] == "end" and got[-1][1]["state"] == "ended"
    assert [f["timestamp_s"] for f in frames[:3]] == pytest.approx([0.0, 0.1, 0.2])
    pixels = decoded_frames(videos / "scene.mp4")
    for k in (0, 17, FRAMES - 1):
        assert_same_detections(without_tracks(frames[k]["detections"]),
                               detect(server.url, pixels[k]))
        assert all(d["track_id"] is None for d in frames[k]["detections"])
    final = status(server.url, stream["id"])
    assert final["frames_in"] == final["frames_processed"] == FRAMES
    assert final["frames_dropped"] == 0


def test_track_ids_follow_the_scene_paths(server: Server, videos: Path) -> None:
    stream = create(server.url, {"source": "scene.mp4"})
    frames = frame_events(events(server.url, stream["id"], timeout_s=120))
    assert len(frames) == FRAMES
    paths = track_ids_by_path(frames)
    assert len(paths) == len(scene.truth(0))  # every path tracked
    for path, ids in paths.items():
        assert len(ids) <= 2, f"path {path} took ids {ids}"  # at most one switch
    # (Float noise aside: a batched run may differ from a single one in the last bits.)
    # Tracked streams drop the boxes the model repeats (dedupe 0.7), as /detect would.
    pixels = decoded_frames(videos / "scene.mp4")
    assert_same_detections(without_tracks(frames[5]["detections"]),
                           detect(server.url, pixels[5], dedupe_iou=0.7))


def test_the_fps_cap_takes_every_other_frame_of_a_10_fps_file(server: Server) -> None:
    stream = create(server.url, {"source": "scene.mp4", "fps": 5, "tracking": False})
    frames = frame_events(events(server.url, stream["id"], timeout_s=120))
    assert [f["frame"] for f in frames] == list(range(0, FRAMES, 2))
    final = status(server.url, stream["id"])
    assert final["frames_skipped"] == FRAMES // 2 and final["state"] == "ended"


def test_a_late_reader_gets_the_kept_events_and_a_reconnecting_one_misses_none(
        server: Server) -> None:
    stream = create(server.url, {"source": "scene.mp4", "tracking": False})
    wait_for_state(server.url, stream["id"], {"ended"}, 120)
    assert [f["frame"] for f in frame_events(events(server.url, stream["id"], 30))] == \
        list(range(FRAMES))
    resumed = httpx.get(f"{server.url}/streams/{stream['id']}/events",
                        headers={"Last-Event-ID": "30"}, timeout=30).text
    assert [int(line[4:]) for line in resumed.splitlines() if line.startswith("id: ")] == \
        list(range(31, FRAMES))
    only_new = events(server.url, stream["id"], 30, after=None)
    assert frame_events(only_new) == [] and only_new[-1][0] == "end"


def test_streams_are_listed_deleted_and_bounded(server: Server) -> None:
    url = server.url
    for stream in httpx.get(f"{url}/streams", timeout=30).json()["streams"]:
        assert httpx.delete(f"{url}/streams/{stream['id']}", timeout=30).status_code == 204
    made = [create(url, {"source": "scene.mp4", "fps": 1, "name": f"s{k}"}) for k in range(4)]
    listed = {s["id"]: s for s in httpx.get(f"{url}/streams", timeout=30).json()["streams"]}
    assert set(listed) == {s["id"] for s in made}
    assert {s["name"] for s in listed.values()} == {"s0", "s1", "s2", "s3"}
    over = httpx.post(f"{url}/streams", json={"source": "scene.mp4"}, timeout=30)
    assert over.status_code == 503 and "MAX_STREAMS" in over.json()["error"]["message"]
    assert httpx.delete(f"{url}/streams/{made[0]['id']}", timeout=30).status_code == 204
    assert httpx.get(f"{url}/streams/{made[0]['id']}", timeout=30).status_code == 404
    assert httpx.delete(f"{url}/streams/{made[0]['id']}", timeout=30).status_code == 404
    create(url, {"source": "scene.mp4", "fps": 1})  # room again
    for stream in httpx.get(f"{url}/streams", timeout=30).json()["streams"]:
        httpx.delete(f"{url}/streams/{stream['id']}", timeout=30)
    wait_until(lambda: metric(url, 'dfine_streams{state="running"}') == 0, 30,
               "no stream to be counted running")


@pytest.mark.parametrize(("body", "code"), [
    ({"source": "../scene.mp4"}, 403), ({"source": "/etc/passwd"}, 403),
    ({"source": "missing.mp4"}, 422), ({"source": "rtsp://127.0.0.1:1/x"}, 403),
    ({"source": "ftp://127.0.0.1/x"}, 422), ({"source": "scene.mp4", "fps": 0}, 422),
    ({"source": "scene.mp4", "model": "nope"}, 404),
    ({"source": "scene.mp4", "classes": ["unicorn"]}, 422),
    ({"source": "scene.mp4", "extra": 1}, 422), ({}, 422),
])
def test_a_bad_stream_request_is_refused_with_its_reason(server: Server, body: dict[str, Any],
                                                         code: int) -> None:
    answer = httpx.post(f"{server.url}/streams", json=body, timeout=30)
    assert answer.status_code == code, answer.text
    assert answer.json()["error"]["message"]


def test_four_streams_share_engine_runs(videos: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, env={"DFINE_VIDEO_DIR": str(videos), "DFINE_MAX_BATCH_SIZE": "8",
                                   "DFINE_MAX_DELAY_MS": "20"}) as server:
        made = [create(server.url, {"source": "scene.mp4", "tracking": False})
                for _ in range(4)]
        # Files go as fast as the engine does, yet /detect is served meanwhile: each stream
        # has at most STREAM_FRAMES_IN_FLIGHT frames in the queue ahead of it.
        answers = []
        while status(server.url, made[0]["id"])["state"] != "ended" and len(answers) < 5:
            answers.append(httpx.post(f"{server.url}/detect", content=jpeg(1), timeout=60,
                                      headers={"Content-Type": "image/jpeg"}))
        assert answers and all(a.status_code == 200 for a in answers), answers[-1].text
        for stream in made:
            wait_for_state(server.url, stream["id"], {"ended"}, 300)
        runs = metric(server.url, "dfine_batch_size_count")
        images = metric(server.url, "dfine_batch_size_sum")
        assert images == 4 * FRAMES + len(answers)
        assert images / runs > 1.2, f"{images} images in {runs} runs"


def jpeg(k: int) -> bytes:
    return encode(scene.frame(k))


async def _answers(url: str, frames: list[bytes], wanted: int, query: str = "",
                   headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    ws_url = url.replace("http://", "ws://") + "/streams/client" + query
    async with websockets.connect(ws_url, additional_headers=headers) as socket:
        for data in frames:
            await socket.send(data)
        got = []
        while len(got) < wanted:
            got.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))
            if got[-1]["frame"] == len(frames):
                break
        return got


def test_a_client_sending_faster_than_the_service_serves_gets_the_newest_frames(
        server: Server) -> None:
    frames = [jpeg(k) for k in range(12)]
    got = asyncio.run(_answers(server.url, frames, 12))
    numbers = [a["frame"] for a in got]
    assert numbers[-1] == 12 and numbers == sorted(numbers)
    assert len(numbers) < 12  # the newest waiting frame won
    assert sum(a["dropped"] for a in got) == 12 - len(numbers) == got[-1]["dropped_total"]
    assert [a["dropped"] for a in got] == [b - a - 1 for a, b in zip([0, *numbers], numbers)]
    want = httpx.post(f"{server.url}/detect", content=frames[-1], params={"dedupe_iou": 0.7},
                      headers={"Content-Type": "image/jpeg"}, timeout=60).json()["detections"]
    assert_same_detections(without_tracks(got[-1]["detections"]), want)


def test_a_client_frame_that_is_not_an_image_gets_its_error_and_the_session_goes_on(
        server: Server) -> None:
    async def scenario() -> list[dict[str, Any]]:
        ws_url = server.url.replace("http://", "ws://") + "/streams/client?tracking=false"
        async with websockets.connect(ws_url) as socket:
            answers = []
            for data in (b"not an image", jpeg(3)):
                await socket.send(data)
                answers.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))
            return answers

    bad, good = asyncio.run(scenario())
    assert bad["frame"] == 1 and bad["error"]["code"] == "invalid_image"
    assert good["frame"] == 2 and good["detections"] and good["detections"][0]["track_id"] is None
    wait_until(lambda: metric(server.url, "dfine_client_sessions") == 0, 30,
               "the sessions to be counted closed")
    assert metric(server.url, 'dfine_client_frames_total{outcome="failed"}') >= 1


def test_streams_need_the_api_key(videos: Path, tmp_path: Path) -> None:
    key = {"X-API-Key": "k3y"}
    with run_server(tmp_path, env={"DFINE_VIDEO_DIR": str(videos), "DFINE_API_KEY": "k3y"}
                    ) as server:
        assert httpx.post(f"{server.url}/streams", json={"source": "scene.mp4"},
                          timeout=30).status_code == 401
        assert httpx.get(f"{server.url}/streams", timeout=30).status_code == 401
        stream = create(server.url, {"source": "scene.mp4", "fps": 1}, headers=key)
        assert httpx.get(f"{server.url}/streams/{stream['id']}/events",
                         timeout=30).status_code == 401
        for query in ("", "?api_key=wrong"):
            with pytest.raises(ConnectionClosed) as closed:
                asyncio.run(_answers(server.url, [jpeg(0)], 1, query))
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert "unauthorized" in closed.value.rcvd.reason
        assert asyncio.run(_answers(server.url, [jpeg(0)], 1, "?api_key=k3y"))[0]["frame"] == 1
        assert asyncio.run(_answers(server.url, [jpeg(0)], 1, headers=key))[0]["frame"] == 1


def test_streams_declared_in_the_settings_start_with_the_service(videos: Path,
                                                                 tmp_path: Path) -> None:
    declared = json.dumps([{"source": "scene.mp4", "name": "lobby", "fps": 2}])
    with run_server(tmp_path, env={"DFINE_VIDEO_DIR": str(videos),
                                   "DFINE_STREAMS": declared}) as server:
        def lobby() -> dict[str, Any] | None:
            streams = httpx.get(f"{server.url}/streams", timeout=30).json()["streams"]
            return next((s for s in streams if s["name"] == "lobby"), None)

        stream = wait_until(lobby, 30, "the declared stream")
        wait_for_state(server.url, stream["id"], {"ended"}, 120)
        assert status(server.url, stream["id"])["frames_processed"] == FRAMES // 5
