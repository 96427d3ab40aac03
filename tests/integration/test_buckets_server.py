"""A real server running its engine in buckets (the GPU path, on CPU sessions): concurrent
answers equal single ones, engine runs happen at bucket sizes, and /model reports buckets."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.batching import BatchPlanner
from app.bench.stats import metric_value
from tests.helpers import (
    Server,
    assert_same_detections,
    detect_concurrently,
    encode,
    render_scene,
    run_server,
)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("buckets"), "--batch-buckets", "1,2,4,8",
                    "--max-batch-size", "8", "--instances", "1",
                    "--max-delay-ms", "20") as running:
        yield running


def runs_up_to(metrics: str, size: int) -> float:
    """Engine runs of at most ``size`` images so far."""
    return metric_value(metrics, f'dfine_batch_size_bucket{{le="{size:.1f}"}}')


def test_concurrent_answers_equal_single_ones_and_runs_are_bucket_sized(bucketed: Server
                                                                        ) -> None:
    images = [encode(render_scene(seed)[0]) for seed in range(300, 306)]
    expected = [httpx.post(f"{bucketed.url}/detect", content=d, timeout=30,
                           headers={"Content-Type": "image/jpeg"}).json()["detections"]
                for d in images]
    for k, answer in enumerate(detect_concurrently(bucketed.url, images, 24)):
        assert_same_detections(answer, expected[k % 6])
    metrics = httpx.get(f"{bucketed.url}/metrics").text
    assert metric_value(metrics, "dfine_images_total") == 30
    # Runs take only sizes the batcher's plan allows for the bucket timings /model reports
    # (on this CPU a batch costs about its size in single runs, so few or none form).
    costs = {b["size"]: b["run_ms"] for b in
             httpx.get(f"{bucketed.url}/model").json()["engine"]["buckets"]}
    planner = BatchPlanner(costs, 8)
    allowed = {planner.take(n) for n in range(1, 31)}
    edges = (1, 2, 3, 4, 6, 8)  # the histogram's buckets up to 8 (app/metrics.py)
    seen = {edge for low, edge in zip((0, *edges), edges)
            if runs_up_to(metrics, edge) > runs_up_to(metrics, low)}
    assert seen <= {next(e for e in edges if e >= size) for size in allowed}, (seen, costs)
    assert metric_value(metrics, "dfine_batch_size_sum") == 30


def test_model_endpoint_and_log_report_the_buckets(bucketed: Server) -> None:
    engine = httpx.get(f"{bucketed.url}/model").json()["engine"]
    assert [b["size"] for b in engine["buckets"]] == [1, 2, 4, 8]
    assert all(b["sessions"] == 1 and b["memory_mb"] is not None and b["run_ms"] > 0
               for b in engine["buckets"])
    assert engine["precision"] == "fp32" and engine["memory_kind"] == "host"
    log = bucketed.log()
    assert "buckets 1,2,4,8" in log and "buckets ready: 1:" in log
