"""A burst of 10x the service's capacity: every request is answered (200, 503 or 504), none
waits past its deadline plus 1 s, memory stays bounded, and latency recovers afterwards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from app.bench.load import Connection
from tests.helpers import encode, render_scene, run_server
from tests.soak import rss_mb

TIMEOUT_S = 2.0


def one_latency(url: str, body: bytes) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{url}/detect", content=body, timeout=30,
                          headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    return time.perf_counter() - started


def test_burst_of_ten_times_capacity(tmp_path: Path) -> None:
    body = encode(render_scene(8)[0])
    with run_server(tmp_path, "--request-timeout-s", str(TIMEOUT_S)) as srv:
        capacity = httpx.get(f"{srv.url}/model").json()["batching"]["max_queue"]
        baseline = sorted(one_latency(srv.url, body) for _ in range(10))[5]
        idle_rss = rss_mb(srv.process.pid)
        port = int(srv.url.rsplit(":", 1)[1])
        peak_rss = idle_rss

        async def burst() -> list[tuple[int, float]]:
            nonlocal peak_rss

            async def one() -> tuple[int, float]:
                connection = Connection("127.0.0.1", port)
                started = time.perf_counter()
                try:
                    status, _ = await connection.request("POST", "/detect", body, "image/jpeg")
                finally:
                    connection.close()
                return status, time.perf_counter() - started

            tasks = [asyncio.create_task(one()) for _ in range(10 * capacity)]
            while not all(t.done() for t in tasks):
                peak_rss = max(peak_rss, rss_mb(srv.process.pid))
                await asyncio.sleep(0.05)
            return [t.result() for t in tasks]

        answers = asyncio.run(burst())
        statuses = [s for s, _ in answers]
        assert set(statuses) <= {200, 503, 504}, set(statuses)
        assert statuses.count(200) >= capacity // 2
        assert max(latency for _, latency in answers) < TIMEOUT_S + 1.0
        assert peak_rss - idle_rss < 400, (idle_rss, peak_rss)
        time.sleep(0.5)
        after = sorted(one_latency(srv.url, body) for _ in range(10))[5]
        assert after < 2 * baseline + 0.02, (baseline, after)
