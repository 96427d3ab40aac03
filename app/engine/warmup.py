"""Warm-up of a bucket's runner: the runs that let onnxruntime capture its CUDA graph, a check
that the captured graph really reads the buffers it is fed, and the timing the batcher plans
with. Each step runs on the runner's own thread (app.engine.runner)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from app.engine.runner import BucketRunner

# The CUDA provider runs a session twice before it captures (cuda_execution_provider.h,
# min_num_runs_before_cuda_graph_capture_ = 2): two runs, the capture, and one replay.
WARM_UP_RUNS = 4
TIMING_RUNS = 5
SCORE_TOLERANCE = 1e-2  # replay against a plain run: separate cuDNN plans differ in the last bits

Feeds = dict[str, npt.NDArray[Any]]
# A run's outputs in the official layout: labels (n, k), boxes (n, k, 4), scores (n, k).
Official = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]


def warm(runner: BucketRunner, feeds: Feeds) -> None:
    for _ in range(WARM_UP_RUNS):
        runner.run(feeds)


def check_feeds(image_input: str, size: int, image_shape: tuple[int, int, int],
                with_sizes: bool, seed: int = 0) -> Feeds:
    """Random images (and random original sizes): unlike the zeros of the warm-up, a graph
    that replays stale inputs answers them wrongly."""
    rng = np.random.default_rng(seed)
    feeds = {image_input: rng.random((size, *image_shape), dtype=np.float32)}
    if with_sizes:
        feeds["orig_target_sizes"] = rng.integers(64, 2048, (size, 2)).astype(np.int64)
    return feeds


def agree(replayed: Official, plain: Official, sizes_wh: npt.NDArray[np.int64]) -> bool:
    """Two runs on the same input give the same detections: every score within
    SCORE_TOLERANCE, and the best box (where no near tie can swap it) within 1 % of the image."""
    _, boxes_a, scores_a = replayed
    _, boxes_b, scores_b = plain
    if scores_a.shape != scores_b.shape or not np.allclose(scores_a, scores_b, rtol=0,
                                                           atol=SCORE_TOLERANCE):
        return False
    scale = np.concatenate([sizes_wh, sizes_wh], axis=1).astype(np.float32)
    for k in range(len(sizes_wh)):
        if scores_a.shape[1] > 1 and scores_a[k, 0] - scores_a[k, 1] < SCORE_TOLERANCE:
            continue  # the first two could swap places between the runs
        if not np.allclose(boxes_a[k, 0] / scale[k], boxes_b[k, 0] / scale[k], atol=1e-2):
            return False
    return True


def replay_matches_plain(runner: BucketRunner, plain: BucketRunner, feeds: Feeds,
                         to_official: Callable[[dict[str, Any], npt.NDArray[np.int64]],
                                               Official]) -> bool:
    """Whether ``runner`` (with its CUDA graph) answers ``feeds`` as ``plain`` (no graph)
    does."""
    sizes = feeds.get("orig_target_sizes")
    if sizes is None:
        first = next(iter(feeds.values()))
        sizes = np.tile(np.asarray([[first.shape[3], first.shape[2]]], np.int64),
                        (len(first), 1))
    return agree(to_official(runner.run(feeds), sizes), to_official(plain.run(feeds), sizes),
                 sizes)
