"""SIGTERM under load: accepted requests complete, new ones get 503, the exit code is 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from app.bench.stats import metric_value
from tests.helpers import encode, render_scene, run_server


def test_sigterm_during_load_finishes_accepted_requests_and_exits_0(tmp_path: Path) -> None:
    image = encode(render_scene(9)[0])
    with run_server(tmp_path, "--max-batch-size", "2", "--max-queue", "64") as srv:
        async def scenario() -> tuple[list[httpx.Response], float, list[int], list[int]]:
            async with httpx.AsyncClient(timeout=60) as http:
                sent = [asyncio.ensure_future(http.post(
                    f"{srv.url}/detect", content=image, headers={"Content-Type": "image/jpeg"}))
                    for _ in range(48)]
                # Signal once a good part of them is accepted and waiting for the engine.
                queued = 0.0
                deadline = time.monotonic() + 20
                while queued < 8 and time.monotonic() < deadline:
                    metrics = (await http.get(f"{srv.url}/metrics")).text
                    queued = metric_value(metrics, "dfine_queue_depth")
                srv.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
                ready, late = [], []
                for _ in range(3):  # while draining, the server still answers, with 503
                    try:
                        ready.append((await http.get(f"{srv.url}/readyz")).status_code)
                        late.append((await http.post(
                            f"{srv.url}/detect", content=image,
                            headers={"Content-Type": "image/jpeg"})).status_code)
                    except httpx.TransportError:  # or, once drained, refuses connections
                        break
                return list(await asyncio.gather(*sent)), queued, ready, late

        started = time.monotonic()
        responses, queued, ready, late = asyncio.run(scenario())
        assert queued >= 8
        statuses = [r.status_code for r in responses]
        # Those accepted before the signal complete; any not yet accepted get not_ready.
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= queued
        assert all(r.json()["detections"] for r in responses if r.status_code == 200)
        assert all(r.json()["error"]["code"] == "not_ready"
                   for r in responses if r.status_code == 503)
        assert set(ready) <= {503} and set(late) <= {503}
        assert ready, "the drain should have been observable"
        assert srv.process.wait(30) == 0
        assert time.monotonic() - started < 40
        assert "draining" in srv.log()
