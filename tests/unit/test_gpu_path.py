"""The GPU path's seams, on the CPU: what each bucket's session is given (batch axis fixed, no
shape arithmetic left, GridSample in fp32 under fp16), the runner's own thread, the replay
check, and the plan made from the providers that really run."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.config import Settings
from app.engine import providers as prov
from app.engine.engine import OnnxEngine
from app.engine.model import inspect_model
from app.engine.runner import BucketRunner
from app.engine.sessions import SessionConfig, open_session, plan_engine, settle_providers
from app.errors import ModelLoadError
from app.inspection import bucket_model, describe, optimized_model
from app.inspection import main as inspect_main
from tests.helpers import DEFAULT_MODEL
from tests.unit.test_buckets import scenes

CPU, CUDA, TRT = prov.CPU, prov.CUDA, prov.TENSORRT


def bucket_engine(buckets: str = "1,2", instances: int = 1, **kwargs: Any) -> OnnxEngine:
    return OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu",
                                    batch_buckets=buckets, max_batch_size=int(buckets[-1]),
                                    instances=instances), **kwargs)


def test_the_shipped_models_batch_axis_is_named_and_fixed_in_each_bucket() -> None:
    assert inspect_model(DEFAULT_MODEL).batch_dim == "N"
    engine = bucket_engine("1,4")
    for size, bucket in engine._buckets.items():
        session = bucket.runners[0].session
        assert [i.shape for i in session.get_inputs()] == [[size, 3, 320, 320], [size, 2]]
        # Every output dimension is known: the runner binds them without a probe run.
        assert [o.shape for o in session.get_outputs()] == [[size, 300], [size, 300, 4],
                                                            [size, 300]]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_no_shape_arithmetic_is_left_in_a_buckets_optimized_graph(
        tmp_path: Path, precision: str) -> None:
    dynamic = describe(optimized_model(bucket_model(DEFAULT_MODEL, precision, None),
                                       tmp_path / "dynamic.onnx"))
    assert dynamic["shape_arithmetic"]["Shape"] > 0  # what a dynamic batch leaves
    fixed = describe(optimized_model(bucket_model(DEFAULT_MODEL, precision, 4),
                                     tmp_path / "b4.onnx"))
    assert fixed["shape_arithmetic"] == {}
    assert fixed["dynamic_dims"] == [] and fixed["nodes"] < dynamic["nodes"]


def test_fp16_keeps_every_gridsample_in_fp32() -> None:
    report = describe(bucket_model(DEFAULT_MODEL, "fp16", 2))
    assert report["fp32_ops"]["GridSample"] == report["ops"]["GridSample"] == 6
    assert "GridSample" not in report["fp16_ops"]
    assert report["fp16_ops"]["Conv"] == report["ops"]["Conv"]  # the heavy work is fp16


def test_inspect_command_prints_and_saves_what_the_engine_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inspect_main(["--bucket", "2", "--save", str(tmp_path / "b2.onnx"),
                  "--save-optimized", str(tmp_path / "b2-opt.onnx")])
    out = capsys.readouterr().out
    assert "images [2, 3, 320, 320]" in out and "labels [2, 300]" in out
    assert "shape arithmetic left: none" in out.split("after onnxruntime")[1]
    saved = onnx.load(str(tmp_path / "b2.onnx"))
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    optimized = onnx.load(str(tmp_path / "b2-opt.onnx"))
    assert not [n for n in optimized.graph.node if n.op_type == "Shape"]


class ThreadSpy:
    """Wraps a real session; records the thread of every run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.threads: list[int] = []

    def run_with_iobinding(self, binding: Any, *args: Any) -> None:
        self.threads.append(threading.get_ident())
        self.session.run_with_iobinding(binding, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def test_a_runner_warms_up_and_runs_on_one_thread_of_its_own() -> None:
    engine = bucket_engine("1,2", instances=2,
                           factory=lambda *a: ThreadSpy(open_session(*a)))
    engine.warm_up()
    images, sizes = scenes(2)
    caller = threading.get_ident()
    results = []
    workers = [threading.Thread(target=lambda: results.append(engine.run(images, sizes)))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 4
    seen: set[int] = set()
    for bucket in engine._buckets.values():
        for runner in bucket.runners:
            spy = runner.session
            assert isinstance(spy, ThreadSpy)
            assert len(spy.threads) >= 4 and len(set(spy.threads)) == 1  # warm-up and runs
            assert spy.threads[0] != caller and spy.threads[0] not in seen
            seen.add(spy.threads[0])


class StaleReplay:
    """Fault injection: a runner that answers every run as it answered its first, as a CUDA
    graph does when it replays the buffers it was captured with instead of the live ones."""

    def __init__(self, runner: BucketRunner) -> None:
        self.runner = runner
        self.size = runner.size
        self.session = runner.session
        self.first: dict[str, np.ndarray] | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answer = self.runner.run(feeds)
        self.first = self.first or answer
        return self.first

    def close(self) -> None:
        self.runner.close()


def graph_engine(stale: bool, required: bool = False) -> OnnxEngine:
    """A CPU engine whose bucket says it has a CUDA graph, so the replay check runs."""
    engine = bucket_engine("2")
    bucket = engine._buckets[2]
    if stale:
        fake: Any = StaleReplay(bucket.runners[0])
        bucket.idle.get()
        bucket.idle.put(fake)
        bucket.runners[:] = [fake]
    bucket.cuda_graph = True
    engine._graph_required = required
    return engine


def test_a_replay_that_answers_like_a_plain_run_keeps_its_graph() -> None:
    engine = graph_engine(stale=False)
    engine.warm_up()
    assert engine.report()["buckets"][0]["cuda_graph"] is True


def test_a_graph_replaying_stale_inputs_is_caught_at_warm_up() -> None:
    engine = graph_engine(stale=True)
    engine.warm_up()
    bucket = engine._buckets[2]
    assert bucket.cuda_graph is False and isinstance(bucket.runners[0], BucketRunner)
    images, sizes = scenes(2)
    out = engine.run(images, sizes)
    assert out.scores[:, 0].min() > 0.5 and not np.allclose(out.scores[0], out.scores[1])
    with pytest.raises(ModelLoadError, match="unlike a plain run"):
        graph_engine(stale=True, required=True).warm_up()


def test_warm_up_times_each_bucket_for_the_batcher() -> None:
    engine = bucket_engine("1,2")
    assert engine.bucket_costs is None
    engine.warm_up()
    costs = engine.bucket_costs
    assert costs is not None and set(costs) == {1, 2} and all(c > 0 for c in costs.values())
    assert [b["run_ms"] > 0 for b in engine.report()["buckets"]] == [True, True]


def test_a_list_of_images_is_stacked_into_the_buckets_buffer() -> None:
    engine = bucket_engine("4")
    images, sizes = scenes(3)
    as_list = engine.run(list(images), sizes)
    as_array = engine.run(images, sizes)
    np.testing.assert_array_equal(as_list.scores, as_array.scores)
    dynamic = OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu"))
    np.testing.assert_allclose(dynamic.run(list(images), sizes).scores, as_array.scores,
                               atol=1e-4)


class ReportsProviders:
    """Fault injection: a session that reports what onnxruntime enabled, as its Python
    wrapper leaves it after a silent fallback (TensorRT without libnvinfer: CUDA, CPU)."""

    def __init__(self, in_use: list[str]) -> None:
        self.in_use = in_use

    def get_providers(self) -> list[str]:
        return self.in_use


def test_a_silent_tensorrt_fallback_is_planned_again_for_cuda() -> None:
    opened: list[list[str]] = []

    def open_first(providers: list[str]) -> ReportsProviders:
        opened.append(providers)
        return ReportsProviders([CUDA, CPU] if providers[0] == TRT else providers)

    in_use, session = settle_providers([TRT, CUDA, CPU], explicit=False, open_first=open_first)
    assert opened == [[TRT, CUDA, CPU], [CUDA, CPU]] and in_use == [CUDA, CPU]
    assert session.get_providers() == [CUDA, CPU]
    info = inspect_model(DEFAULT_MODEL)
    # What runs decides the plan: CUDA gets its buckets and graphs, TensorRT one profile.
    cuda = plan_engine(Settings(), info, in_use)
    assert cuda.buckets == (1, 2, 4, 8, 16, 32) and cuda.cuda_graph
    assert cuda.config(8, True).providers[0][1]["enable_cuda_graph"] == "1"
    trt = plan_engine(Settings(), info, [TRT, CUDA, CPU])
    assert trt.buckets is None and not trt.cuda_graph
    with pytest.raises(ModelLoadError, match="did not enable"):
        settle_providers([TRT, CUDA, CPU], explicit=True, open_first=open_first)


def test_the_engine_plans_for_the_providers_its_first_session_reports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole load with a factory whose CUDA sessions come back on the CPU (CUDA's libraries
    missing): the engine drops the CUDA plan, runs one dynamic CPU session, and says so."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    asked: list[SessionConfig] = []

    def factory(source: Any, config: SessionConfig) -> ort.InferenceSession:
        asked.append(config)
        return open_session(source, SessionConfig([(CPU, {})], config.threads, config.spin,
                                                  config.batch_dim, config.bucket))

    engine = OnnxEngine.load(Settings(model_path=DEFAULT_MODEL), factory=factory)
    assert asked[0].bucket == 1 and asked[0].providers[0][0] == CUDA  # CUDA's plan first
    assert all(c.providers[0][0] == CPU and c.bucket is None for c in asked[1:])
    assert engine.buckets is None
    report = engine.report()
    assert report["providers_asked"] == [CUDA, CPU]
    assert report["providers_running"] == [CPU]
    images, sizes = scenes(1)
    assert engine.run(images, sizes).scores[0, 0] > 0.5


class UnsettledOutputs:
    """Fault injection: a session whose output has a dimension onnxruntime could not infer
    (an exporter's data-dependent one): the runner learns it from one run instead."""

    class Arg:
        def __init__(self, name: str, shape: list[Any], kind: str) -> None:
            self.name, self.shape, self.type = name, shape, kind

    def get_outputs(self) -> list[Any]:
        return [self.Arg("scores", [2, "K"], "tensor(float)")]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert feeds["images"].shape == (2, 3, 8, 8)
        return [np.zeros((2, 7), np.float32)]


def test_outputs_the_session_cannot_size_are_sized_by_one_run() -> None:
    from app.engine.runner import TensorSpec, output_specs

    specs = output_specs(UnsettledOutputs(), ["scores"],  # type: ignore[arg-type]
                         [TensorSpec("images", (2, 3, 8, 8), np.float32)])
    assert [(s.name, s.shape, s.dtype) for s in specs] == [("scores", (2, 7), np.float32)]
