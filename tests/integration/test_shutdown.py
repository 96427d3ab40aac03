"""SIGTERM under load: accepted requests complete, new ones get 503, the exit code is 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from tests.helpers import encode, render_scene, run_server


def test_sigterm_during_load_finishes_accepted_requests_and_exits_0(tmp_path: Path) -> None:
    image = encode(render_scene(9)[0])
    with run_server(tmp_path, "--max-batch-size", "2", "--max-queue", "64") as srv:
        async def scenario() -> tuple[list[httpx.Response], list[int], list[int]]:
            async with httpx.AsyncClient(timeout=60) as http:
                accepted = [asyncio.ensure_future(http.post(
                    f"{srv.url}/detect", content=image, headers={"Content-Type": "image/jpeg"}))
                    for _ in range(48)]
                await asyncio.sleep(0.15)  # all sent and admitted; most still queued
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
                return list(await asyncio.gather(*accepted)), ready, late

        started = time.monotonic()
        responses, ready, late = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 48
        assert all(r.json()["detections"] for r in responses)
        assert set(ready) <= {503} and set(late) <= {503}
        assert ready, "the drain should have been observable"
        assert srv.process.wait(30) == 0
        assert time.monotonic() - started < 30
        assert "draining" in srv.log()
