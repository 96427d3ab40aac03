"""Batch buckets: the choice of sizes, the batcher's preference for them, and the engine's
bucket sessions on the CPU (the same code the GPU runs, with host buffers)."""

from __future__ import annotations

import asyncio
import queue
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from app.batching import BatchPlanner
from app.config import Settings, settings_from_args
from app.engine.buckets import bucket_for, parse_buckets, resolve_buckets
from app.engine.engine import Bucket, OnnxEngine, _make_runners
from app.engine.sessions import open_session, parallelism
from app.errors import ModelLoadError
from app.imaging import prepare
from tests import onnx_models
from tests.helpers import DEFAULT_MODEL, render_scene
from tests.unit.test_batcher import StubEngine, make, occupy, queued


def test_bucket_lists_parse_sorted_and_bad_ones_are_refused() -> None:
    assert parse_buckets("auto") is None
    assert parse_buckets(" 8,1,2,2 ,4") == (1, 2, 4, 8)
    for bad in ("", "0,2", "a", "1,300", ","):
        with pytest.raises(ValueError):
            parse_buckets(bad)
    with pytest.raises(ValueError, match="batch buckets"):
        Settings(batch_buckets="two")
    assert settings_from_args(["--batch-buckets", "4,1"]).bucket_sizes == (1, 4)


def test_auto_buckets_are_powers_of_two_on_cuda_and_none_elsewhere() -> None:
    assert resolve_buckets(None, 32, on_cuda=True, fixed_batch=None) == (1, 2, 4, 8, 16, 32)
    assert resolve_buckets(None, 8, on_cuda=True, fixed_batch=None) == (1, 2, 4, 8)
    assert resolve_buckets(None, 12, on_cuda=True, fixed_batch=None) == (1, 2, 4, 8, 12)
    assert resolve_buckets(None, 8, on_cuda=False, fixed_batch=None) is None
    # Explicit ones apply on any provider; the largest batch always has a bucket.
    assert resolve_buckets((2, 4, 16), 8, on_cuda=False, fixed_batch=None) == (2, 4, 8)
    assert resolve_buckets((1, 2), 8, on_cuda=True, fixed_batch=4) == (4,)


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it() -> None:
    buckets = (1, 2, 4, 8)
    assert [bucket_for(n, buckets) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9, buckets)


def test_untimed_buckets_are_filled_exactly_largest_first() -> None:
    planner = BatchPlanner.linear((1, 2, 4, 8), 8)
    assert [planner.take(n) for n in range(1, 11)] == [1, 2, 2, 4, 4, 4, 4, 8, 8, 8]
    assert BatchPlanner.linear((4, 8), 8).take(3) == 3  # fewer than the smallest: all, padded
    assert BatchPlanner.linear(None, 8).take(6) == 6
    assert BatchPlanner.linear(None, 8).take(20) == 8


def test_timed_buckets_split_the_queue_at_the_least_cost() -> None:
    # D-FINE-L 640 on an H200 (FACTS.md), the sizes between interpolated: one padded 32
    # (80 ms) beats 16 + 8 + 4 + 2 + 1 (~120 ms).
    gpu = {1: 13.0, 2: 15.0, 4: 18.0, 8: 24.6, 16: 45.0, 32: 80.0}
    planner = BatchPlanner(gpu, 32)
    assert planner.take(31) == 31  # all of them, in the bucket of 32
    assert planner.take(32) == 32
    assert planner.take(40) == 32  # then 8
    assert planner.take(3) == 3  # padded to 4: cheaper than 2 + 1
    # Where every image costs the same, padding never pays and buckets are filled exactly.
    linear = BatchPlanner({1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0}, 8)
    assert [linear.take(n) for n in (3, 5, 7, 12)] == [2, 4, 4, 8]
    # A fixed cost per run, as on a GPU at small batches: fewer, larger runs.
    overhead = BatchPlanner({1: 10.0, 2: 10.5, 4: 11.0, 8: 12.0}, 8)
    assert [overhead.take(n) for n in (3, 5, 7, 9)] == [3, 5, 7, 8]


async def test_batcher_leaves_what_exceeds_a_bucket_for_the_next_batch() -> None:
    engine = StubEngine()
    engine.release.clear()  # the first run blocks while six more queue up
    batcher = make(engine, max_batch_size=8, max_delay_s=0.05, batch_sizes=(1, 2, 4, 8))
    first = await occupy(batcher, engine)
    rest = [asyncio.ensure_future(batcher.submit(i, timeout_s=5)) for i in range(1, 7)]
    await queued(batcher, 6)
    engine.release.set()
    assert await asyncio.gather(first, *rest) == [i * 2 for i in range(7)]
    assert engine.batches == [[0], [1, 2, 3, 4], [5, 6]]  # in order, at bucket sizes
    await batcher.stop()


def test_gpu_defaults_batch_32_one_sleeping_thread_and_a_decode_worker_per_core() -> None:
    gpu = parallelism(Settings(), ["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    assert (gpu.max_batch_size, gpu.instances, gpu.threads, gpu.spin) == (32, 1, 1, False)
    cpu = parallelism(Settings(), ["CPUExecutionProvider"], None)
    assert (cpu.max_batch_size, cpu.spin) == (1, True)
    assert cpu.decode_workers <= 4 and gpu.decode_workers >= cpu.decode_workers


def scenes(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready tensors (n, 3, 320, 320) of rendered scenes, and their sizes (n, 2)."""
    tensors, sizes = [], []
    for seed in range(count):
        image = render_scene(seed + 40)[0]
        tensors.append(prepare(image, 320, 320).pixels)
        sizes.append((image.shape[1], image.shape[0]))
    return np.stack(tensors), np.asarray(sizes, np.int64)


def test_a_padded_batch_gives_what_each_image_gives_alone() -> None:
    engine = OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu",
                                      batch_buckets="1,4", max_batch_size=4))
    assert engine.buckets == (1, 4)
    images, sizes = scenes(3)
    together = engine.run(images, sizes)  # 3 images in the bucket of 4
    assert together.scores.shape == (3, 300)
    for k in range(3):
        alone = engine.run(images[k:k + 1], sizes[k:k + 1])
        np.testing.assert_array_equal(together.labels[k], alone.labels[0])
        np.testing.assert_allclose(together.scores[k], alone.scores[0], atol=1e-5)
        np.testing.assert_allclose(together.boxes[k], alone.boxes[0], atol=1e-2)
    assert together.scores[:, 0].min() > 0.5  # real detections, not padding


class ShapeSpy:
    """Wraps a real session and records the shape of every input it is run with."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.shapes: set[tuple[str, tuple[int, ...]]] = set()
        self.bound: dict[str, tuple[int, ...]] = {}

    def io_binding(self) -> Any:
        spy = self
        binding = self.session.io_binding()

        class Binding:
            def bind_ortvalue_input(self, name: str, value: ort.OrtValue) -> None:
                spy.bound[name] = tuple(value.shape())
                binding.bind_ortvalue_input(name, value)

            def __getattr__(self, name: str) -> Any:
                return getattr(binding, name)

        self._binding = binding
        return Binding()

    def run_with_iobinding(self, _binding: Any, *args: Any) -> None:
        self.shapes.update(self.bound.items())
        self.session.run_with_iobinding(self._binding, *args)

    def run(self, names: Any, feeds: dict[str, np.ndarray], *args: Any) -> Any:
        self.shapes.update((k, v.shape) for k, v in feeds.items())
        return self.session.run(names, feeds, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def test_each_bucket_session_only_ever_sees_its_own_shape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu",
                                      batch_buckets="1,2,4", max_batch_size=4, instances=2),
                             factory=lambda *a: ShapeSpy(open_session(*a)))
    engine.warm_up()
    images, sizes = scenes(4)
    for n in (1, 2, 3, 4, 1, 3):
        assert engine.run(images[:n], sizes[:n]).scores.shape == (n, 300)
    for bucket in engine._buckets.values():
        assert len(bucket.runners) == 2  # one per instance
        for runner in bucket.runners:
            spy = runner.session
            assert isinstance(spy, ShapeSpy)
            assert spy.shapes == {("images", (bucket.size, 3, 320, 320)),
                                  ("orig_target_sizes", (bucket.size, 2))}


def test_report_lists_buckets_with_their_memory() -> None:
    engine = OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu",
                                      batch_buckets="1,2", max_batch_size=2, instances=1))
    engine.warm_up()
    report = engine.report()
    assert report["memory_kind"] == "host" and report["precision"] == "fp32"
    assert [(b["size"], b["sessions"], b["cuda_graph"]) for b in report["buckets"]] == [
        (1, 1, False), (2, 1, False)]
    assert all(b["memory_mb"] is not None and b["memory_mb"] > 0 for b in report["buckets"])
    assert OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu")
                           ).report()["buckets"] == []


def test_fixed_batch_and_raw_head_models_run_through_buckets(tmp_path: Path) -> None:
    fixed = OnnxEngine.load(Settings(model_path=onnx_models.official(tmp_path / "b2.onnx",
                                                                     batch=2),
                                     providers="cpu"))
    assert fixed.buckets == (2,)
    one = fixed.run(np.zeros((1, 3, 64, 64), np.float32), np.asarray([[200, 100]], np.int64))
    assert one.boxes[0, 0].tolist() == pytest.approx([20, 20, 100, 60])
    raw = OnnxEngine.load(Settings(model_path=onnx_models.raw_head(tmp_path / "raw.onnx"),
                                   providers="cpu", batch_buckets="4", max_batch_size=4))
    out = raw.run(np.zeros((3, 3, 64, 64), np.float32), np.asarray([[200, 100]] * 3, np.int64))
    assert out.labels[:, :2].tolist() == [[1, 0]] * 3
    assert out.boxes[2, 0].tolist() == pytest.approx([20, 20, 100, 60])


class CaptureFails:
    """Fault injection: a runner whose run fails as a CUDA graph capture can."""

    size = 1
    session = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("CUDA graph capture failed")

    def close(self) -> None:
        pass


def engine_with_failing_graph(graph_required: bool) -> OnnxEngine:
    engine = OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu",
                                      batch_buckets="1", max_batch_size=1))
    failing: Any = CaptureFails()
    idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
    idle.put(failing)
    engine._buckets = {1: Bucket(1, idle, [failing], cuda_graph=True)}
    engine._graph_required = graph_required
    return engine


def test_a_bucket_whose_cuda_graph_fails_runs_without_one() -> None:
    engine = engine_with_failing_graph(graph_required=False)
    engine.warm_up()
    assert engine.report()["buckets"][0]["cuda_graph"] is False
    images, sizes = scenes(1)
    assert engine.run(images, sizes).scores[0, 0] > 0.5
    with pytest.raises(ModelLoadError, match="CUDA graph"):
        engine_with_failing_graph(graph_required=True).warm_up()


def test_sessions_that_refuse_a_cuda_graph_are_made_without_one() -> None:
    made: list[bool] = []

    def make_runner(size: int, cuda_graph: bool, session: Any = None) -> Any:
        if cuda_graph:
            raise ModelLoadError("all nodes must be on the CUDA provider")
        made.append(cuda_graph)
        return object()

    runners, graph = _make_runners(make_runner, 4, 2, want_graph=True, graph_required=False)
    assert len(runners) == 2 and graph is False and made == [False, False]
    with pytest.raises(ModelLoadError):
        _make_runners(make_runner, 4, 2, want_graph=True, graph_required=True)
