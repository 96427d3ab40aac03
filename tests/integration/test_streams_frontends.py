"""Streams with FRONTENDS=2: front end 0 runs them, the other hands /streams to it, so that
every connection sees the same streams, whichever front end takes it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import websockets

from tests.helpers import encode, metric, run_server, wait_until
from tests.integration.stream_client import create, events, frame_events
from tests.integration.test_frontends import connections_to_each, frontend_pids
from tests.video import scene


def test_every_front_end_serves_the_same_streams(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    scene.write_video(videos / "scene.mp4", 20, 10.0)
    with run_server(tmp_path, env={"DFINE_FRONTENDS": "2", "DFINE_VIDEO_DIR": str(videos)},
                    ready_timeout_s=120) as server:
        stream = create(server.url, {"source": "scene.mp4", "tracking": False})
        pids = wait_until(lambda: len(found := frontend_pids(server)) == 2 and found, 60,
                          "two front ends")
        for connection in connections_to_each(server, pids).values():
            connection.request("GET", "/streams")
            listed = json.loads(connection.getresponse().read())
            assert [s["id"] for s in listed["streams"]] == [stream["id"]]
            connection.close()
        frames = frame_events(events(server.url, stream["id"], timeout_s=120))
        assert [f["frame"] for f in frames] == list(range(20))
        assert metric(server.url, "dfine_stream_frames_processed_total") == 20
        # Requests forwarded to front end 0 are counted once, by it.
        assert metric(server.url, 'dfine_requests_total{endpoint="/streams"}') >= 1

        async def client_frame() -> dict[str, object]:
            ws_url = server.url.replace("http://", "ws://") + "/streams/client"
            async with websockets.connect(ws_url) as socket:
                await socket.send(encode(scene.frame(0)))
                return dict(json.loads(await asyncio.wait_for(socket.recv(), 60)))

        for _ in range(4):
            assert asyncio.run(client_frame())["frame"] == 1
        for _ in range(6):  # deleted through whichever front end: gone for all
            answer = httpx.delete(f"{server.url}/streams/{stream['id']}", timeout=30)
            assert answer.status_code in (204, 404)
            assert httpx.get(f"{server.url}/streams/{stream['id']}",
                             timeout=30).status_code == 404
        wait_until(lambda: metric(server.url, "dfine_client_sessions") == 0, 30,
                   "the client sessions to be counted closed")
