"""A burst of 10x the service's capacity: every request is answered (200, 503 or 504), none
waits past its deadline plus 1 s, memory stays bounded, and latency recovers afterwards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from app.bench.load import Connection
from tests.helpers import encode, render_scene, run_server, wait_until
from tests.soak import rss_mb

TIMEOUT_S = 2.0
# A lone request's median latency here on an idle 2-core machine (docs/performance.md: 22 ms
# at c=1, plus a new connection per request), rounded up.
IDLE_LATENCY_S = 0.04


def slowdown(baseline_s: float) -> float:
    """How many times slower than idle the machine answers now (1 at least): on a loaded CI
    machine every overhead (decoding, runs, the client's own 320 connections) stretches by it,
    and fewer images start within the deadline."""
    return max(1.0, baseline_s / IDLE_LATENCY_S)


def median_latency(url: str, body: bytes) -> float:
    return sorted(one_latency(url, body) for _ in range(10))[5]


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
        baseline = median_latency(srv.url, body)
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
        slow = slowdown(baseline)  # 1 on an idle machine: the bounds as they always were
        assert set(statuses) <= {200, 503, 504}, set(statuses)
        assert statuses.count(200) >= capacity // 2 / slow, (statuses.count(200), baseline)
        longest = max(latency for _, latency in answers)
        assert longest < TIMEOUT_S + 1.0 * slow, (longest, baseline)
        assert peak_rss - idle_rss < 400, (idle_rss, peak_rss)
        # Latency recovers: soon back near the baseline (the machine's own noise aside), not
        # held up by work the burst left behind.
        wait_until(lambda: median_latency(srv.url, body) < 2 * baseline + 0.02, 30,
                   f"the median latency back under 2 x {baseline:.3f} s + 20 ms")
