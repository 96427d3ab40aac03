"""The onnxruntime engine: runs batches of prepared images on the sessions its plan calls for.

It knows nothing of HTTP or batching: ``run`` takes n images (3, H, W) and returns the official
layout's three arrays, whatever the model's own layout.

Two ways to run. Without buckets (the CPU default): one session for every batch size, and on
a CPU a second one with all the cores for lone runs. With buckets (the CUDA default): a session
per bucket and engine instance, its batch axis fixed, fed through buffers bound once
(app.engine.runner), a batch padded to its bucket.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from app.config import Settings
from app.engine import providers as prov
from app.engine import warmup
from app.engine.buckets import bucket_for
from app.engine.layouts import raw_head_to_official
from app.engine.memory import MemoryKind, memory_used_bytes
from app.engine.model import ModelInfo, inspect_model
from app.engine.runner import BucketRunner, Device, Rows, TensorSpec, output_specs
from app.engine.sessions import (
    EnginePlan,
    ModelSource,
    Parallelism,
    SessionFactory,
    model_source,
    open_session,
    plan_engine,
    settle_providers,
)
from app.errors import ModelLoadError

log = logging.getLogger("dfine.engine")

TOP_K = 300


@dataclass
class Detections:
    """A batch in the official layout: labels (n, k), boxes (n, k, 4) xyxy in the pixels of the
    sizes passed in, scores (n, k) sorted descending."""

    labels: npt.NDArray[np.int64]
    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]


@dataclass
class Bucket:
    """A bucket's runners (one per engine instance), what they cost and how long a run takes."""

    size: int
    idle: queue.SimpleQueue[BucketRunner]
    runners: list[BucketRunner]
    cuda_graph: bool
    memory_bytes: int | None = None
    run_s: float | None = None  # median run, timed at warm-up


RemakeRunner = Callable[[int, bool], BucketRunner]  # (size, cuda_graph) -> a new runner


class OnnxEngine:
    """Runs batches of prepared images; ``run`` is thread-safe."""

    def __init__(self, info: ModelInfo, parallel: Parallelism | None = None,
                 session: ort.InferenceSession | None = None,
                 solo_session: ort.InferenceSession | None = None,
                 buckets: list[Bucket] | None = None, remake: RemakeRunner | None = None,
                 graph_required: bool = False) -> None:
        self.session = session
        self.solo_session = solo_session
        self.info = info
        self.parallel = parallel or Parallelism(1, 0, info.fixed_batch or 1)
        self._buckets = {b.size: b for b in buckets or []}
        self._bucket_sizes = tuple(sorted(self._buckets))
        self._remake = remake  # a bucket's runner again (without a CUDA graph: the fallback)
        self._graph_required = graph_required
        self._running = 0
        self._running_lock = threading.Lock()
        # Without buckets on a GPU (TensorRT's dynamic profile), IO binding names every output
        # instead of trusting their order and leaves them on the device until copied back.
        self._bind_device = "cuda" if self.on_gpu else None

    @property
    def buckets(self) -> tuple[int, ...] | None:
        """The batch sizes runs are padded to; None: any size runs as it is."""
        return self._bucket_sizes or None

    @property
    def bucket_costs(self) -> dict[int, float] | None:
        """Seconds a run of each bucket takes, once warm-up has timed them all."""
        costs = {size: b.run_s for size, b in self._buckets.items()}
        if not costs or any(v is None for v in costs.values()):
            return None
        return {size: float(v) for size, v in costs.items() if v is not None}

    @classmethod
    def load(cls, settings: Settings, factory: SessionFactory = open_session,
             name: str | None = None) -> OnnxEngine:
        """The engine for ``settings.model_path``, served as ``name`` (default: its stem)."""
        info = inspect_model(settings.model_path, settings.labels_path, name,
                             settings.input_size_wh)
        asked = prov.choose_providers(settings.provider_list, ort.get_available_providers())
        if asked != [prov.CPU] and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu[cuda,cudnn] ships CUDA and cuDNN as pip wheels: load them from
            # site-packages, so the image needs no LD_LIBRARY_PATH for them.
            ort.preload_dlls()

        def open_first(providers: list[str]) -> _Builder:
            builder = _Builder(settings, info, plan_engine(settings, info, providers), factory)
            builder.open_first()
            return builder

        in_use, builder = settle_providers(asked, settings.provider_list != ["auto"],
                                           open_first)
        info = replace(info, providers=in_use, providers_asked=asked,
                       precision=settings.precision)
        engine = builder.build(info)
        log.info("loaded %s: layout %s, input %dx%d, batch %s, %s classes, providers %s "
                 "(asked %s), precision %s, %d instance(s) x %s thread(s), batches of up to "
                 "%d, buckets %s", info.path, info.layout, info.input_width, info.input_height,
                 info.fixed_batch or "dynamic", len(info.labels) if info.labels else "unnamed",
                 in_use, asked, settings.precision, engine.parallel.instances,
                 engine.parallel.threads or "default", engine.parallel.max_batch_size,
                 ",".join(map(str, engine.buckets or ())) or "none")
        return engine

    def run(self, images: Rows, sizes_wh: npt.NDArray[np.int64],
            may_use_all_cores: bool = True) -> Detections:
        """images: n images (3, H, W) float32, as one (n, 3, H, W) array or a list; sizes_wh
        (n, 2) int64 -> detections for n images.

        ``may_use_all_cores``: the caller expects no other run soon (nothing queued), so a run
        with no other in flight may take the solo session's threads."""
        n = len(images)
        feeds: dict[str, Rows] = {self.info.image_input: images}
        if self.info.layout == "official":
            feeds["orig_target_sizes"] = sizes_wh
        if self._buckets:
            bucket = self._buckets[bucket_for(n, self._bucket_sizes)]
            runner = bucket.idle.get()  # one per instance: free unless a run hung
            try:
                named = runner.run(feeds)
            finally:
                bucket.idle.put(runner)
        else:
            named = self._run_dynamic(feeds, may_use_all_cores)
        labels, boxes, scores = self._official(named, sizes_wh)
        return Detections(labels[:n].astype(np.int64, copy=False),
                          boxes[:n].astype(np.float32, copy=False),
                          scores[:n].astype(np.float32, copy=False))

    def _official(self, named: dict[str, Any], sizes_wh: npt.NDArray[np.int64]
                  ) -> warmup.Official:
        results = [named[name] for name in self.info.output_names]
        if self.info.layout == "official":
            return results[0], results[1], results[2]
        return raw_head_to_official(results[0], results[1], sizes_wh, TOP_K)

    def _run_dynamic(self, feeds: dict[str, Rows], may_use_all_cores: bool
                     ) -> dict[str, Any]:
        assert self.session is not None
        arrays = {name: rows if isinstance(rows, np.ndarray) else np.stack(rows)
                  for name, rows in feeds.items()}
        names = self.info.output_names
        with self._running_lock:
            alone = self._running == 0 and may_use_all_cores
            self._running += 1
        try:
            if alone and self.solo_session is not None:
                results = list(self.solo_session.run(names, arrays))
            elif self._bind_device is None:
                results = list(self.session.run(names, arrays))
            else:
                results = run_with_binding(self.session, arrays, names, self._bind_device)
        finally:
            with self._running_lock:
                self._running -= 1
        return dict(zip(names, results))

    def warm_up(self) -> None:
        """Run every batch size (every bucket's every runner) before the first request, so no
        user request pays for a first run: cuDNN's algorithm search, CUDA graph capture,
        TensorRT's engine build or cache load, memory arena growth. Each bucket is timed
        afterwards (``bucket_costs``)."""
        if not self._buckets:
            for n in range(1, self.parallel.max_batch_size + 1):
                images, sizes = self._zeros(n)
                self.run(images, sizes)  # alone: with the solo session, if there is one
                if self.solo_session is not None:
                    self.run(images, sizes, may_use_all_cores=False)
            return
        kind: MemoryKind = "gpu" if self.on_gpu else "host"
        for bucket in self._buckets.values():
            before = memory_used_bytes(kind)
            self._warm_bucket(bucket)
            after = memory_used_bytes(kind)
            if bucket.memory_bytes is not None and before is not None and after is not None:
                bucket.memory_bytes += after - before
            bucket.run_s = bucket.runners[0].time_run(self._zero_feeds(bucket.size),
                                                      warmup.TIMING_RUNS)
        log.info("buckets ready: %s (%s memory)", ", ".join(
            f"{b.size}: {_ms(b.run_s)} ms a run, {_mb(b.memory_bytes)} MB"
            f"{' with CUDA graph' if b.cuda_graph else ''}" for b in self._buckets.values()),
            kind)

    def _zeros(self, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """n black images at the model's input size, and their sizes."""
        h, w = self.info.input_height, self.info.input_width
        return (np.zeros((n, 3, h, w), np.float32),
                np.tile(np.asarray([[w, h]], np.int64), (n, 1)))

    def _zero_feeds(self, size: int) -> warmup.Feeds:
        images, sizes = self._zeros(size)
        feeds: warmup.Feeds = {self.info.image_input: images}
        if self.info.layout == "official":
            feeds["orig_target_sizes"] = sizes
        return feeds

    def _warm_bucket(self, bucket: Bucket) -> None:
        """Warm every runner (each captures its CUDA graph on its own thread, one at a time:
        a capture tolerates no other thread's CUDA work), and check that a graph replays what
        a plain run answers. A bucket whose graph fails either way runs without one (or the
        failure is raised, with CUDA_GRAPH=on)."""
        feeds = self._zero_feeds(bucket.size)
        try:
            for runner in bucket.runners:
                warmup.warm(runner, feeds)
                if bucket.cuda_graph and self._remake is not None:
                    self._check_replay(bucket, runner)
            return
        except Exception as exc:
            if not bucket.cuda_graph or self._remake is None:
                raise
            if self._graph_required:
                raise ModelLoadError(f"CUDA graph of bucket {bucket.size} failed: {exc}") from exc
            log.warning("bucket %d: CUDA graph failed (%s); running it without", bucket.size,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        replacements = [self._remake(bucket.size, False) for _ in bucket.runners]
        _replace_runners(bucket, replacements)
        bucket.cuda_graph = False
        for runner in replacements:
            warmup.warm(runner, feeds)

    def _check_replay(self, bucket: Bucket, runner: BucketRunner) -> None:
        assert self._remake is not None
        h, w = self.info.input_height, self.info.input_width
        feeds = warmup.check_feeds(self.info.image_input, bucket.size, (3, h, w),
                                   self.info.layout == "official")
        plain = self._remake(bucket.size, False)
        try:
            if not warmup.replay_matches_plain(runner, plain, feeds, self._official):
                raise RuntimeError("its replay answers random input unlike a plain run")
        finally:
            plain.close()

    def close(self) -> None:
        """Give back the sessions (and their memory) and the runners' threads; nothing may
        run afterwards. onnxruntime frees a session when the last reference goes."""
        for bucket in self._buckets.values():
            for runner in bucket.runners:
                runner.close()
            bucket.runners.clear()
            while not bucket.idle.empty():
                bucket.idle.get()
        self._buckets.clear()
        self._remake = None
        self.session = self.solo_session = None

    @property
    def on_gpu(self) -> bool:
        return self.info.providers[:1] != [prov.CPU]

    def report(self) -> dict[str, Any]:
        """How the engine runs, for /model and the log."""
        return {
            "providers_asked": self.info.providers_asked or self.info.providers,
            "providers_running": self.info.providers,
            "precision": self.info.precision,
            "instances": self.parallel.instances,
            "intra_op_threads": self.parallel.threads,
            "decode_workers": self.parallel.decode_workers,
            "memory_kind": "gpu" if self.on_gpu else "host",
            "buckets": [{"size": b.size, "sessions": len(b.runners), "cuda_graph": b.cuda_graph,
                         "memory_mb": _mb(b.memory_bytes), "run_ms": _ms(b.run_s)}
                        for b in self._buckets.values()],
        }


class _Builder:
    """Opens the sessions and runners one plan calls for: the first one alone (to see which
    providers onnxruntime really enabled), then the rest."""

    def __init__(self, settings: Settings, info: ModelInfo, plan: EnginePlan,
                 factory: SessionFactory) -> None:
        self.settings, self.info, self.plan, self.factory = settings, info, plan, factory
        self.source: ModelSource = model_source(info.path, settings.precision, plan.providers)
        self.first: ort.InferenceSession | None = None
        self.first_graph = plan.cuda_graph

    def get_providers(self) -> list[str]:
        assert self.first is not None
        return list(self.first.get_providers())

    def session(self, bucket: int | None, cuda_graph: bool) -> ort.InferenceSession:
        return self.factory(self.source, self.plan.config(bucket, cuda_graph,
                                                          batch_dim=self.info.batch_dim))

    def open_first(self) -> None:
        if self.plan.buckets is None:
            self.first = self.session(None, False)
            return
        size = self.plan.buckets[0]
        self.first, self.first_graph = _with_graph_if_accepted(
            lambda graph: self.session(size, graph), size, self.plan.cuda_graph,
            self.settings.cuda_graph == "on")

    def take_first(self) -> ort.InferenceSession:
        session, self.first = self.first, None
        assert session is not None
        return session

    def build(self, info: ModelInfo) -> OnnxEngine:
        plan = self.plan
        graph_required = self.settings.cuda_graph == "on"
        if plan.buckets is None:
            solo = None
            if plan.parallel.solo_threads:
                solo = self.factory(self.source,
                                    plan.config(cpu_threads=plan.parallel.solo_threads))
            return OnnxEngine(info, plan.parallel, self.take_first(), solo)
        device: Device = "cuda" if plan.on_gpu else "cpu"
        h, w = info.input_height, info.input_width
        inputs = [TensorSpec(info.image_input, (1, 3, h, w), np.float32)]
        if info.layout == "official":
            inputs.append(TensorSpec("orig_target_sizes", (1, 2), np.int64))
        fill = {"orig_target_sizes": np.asarray([w, h], np.int64)}

        def make_runner(size: int, cuda_graph: bool,
                        session: ort.InferenceSession | None = None) -> BucketRunner:
            session = session or self.session(size, cuda_graph)
            sized = [_at(s, size) for s in inputs]
            return BucketRunner(session, size, sized,
                                output_specs(session, info.output_names, sized), device,
                                fill=fill)

        memory_kind: MemoryKind = "gpu" if plan.on_gpu else "host"
        buckets = []
        for index, size in enumerate(plan.buckets):
            before = memory_used_bytes(memory_kind)
            first = self.take_first() if index == 0 else None
            graph = self.first_graph if index == 0 else plan.cuda_graph
            runners, graph = _make_runners(make_runner, size, plan.parallel.instances, graph,
                                           graph_required, first)
            after = memory_used_bytes(memory_kind)
            idle: queue.SimpleQueue[BucketRunner] = queue.SimpleQueue()
            for runner in runners:
                idle.put(runner)
            buckets.append(Bucket(size, idle, runners, graph,
                                  None if before is None or after is None else after - before))
        return OnnxEngine(info, plan.parallel, buckets=buckets,
                          remake=lambda size, graph: make_runner(size, graph),
                          graph_required=graph_required)


T = TypeVar("T")


def _with_graph_if_accepted(open_with: Callable[[bool], T], size: int, want_graph: bool,
                            graph_required: bool) -> tuple[T, bool]:
    """``open_with(cuda_graph)``, with a graph if wanted and onnxruntime accepts one for this
    model (it refuses at session creation when a node is not on CUDA), else without; and
    whether it has one."""
    if want_graph:
        try:
            return open_with(True), True
        except ModelLoadError as exc:
            if graph_required:
                raise
            log.warning("bucket %d: no CUDA graph (%s); running it without", size, exc)
    return open_with(False), False


def _make_runners(make: Callable[..., BucketRunner], size: int, count: int, want_graph: bool,
                  graph_required: bool, first: ort.InferenceSession | None = None
                  ) -> tuple[list[BucketRunner], bool]:
    """``count`` runners of a bucket. The first decides whether they have CUDA graphs: opened
    here (``_with_graph_if_accepted``), or given as ``first``, a session already opened with
    ``want_graph`` settled."""
    if first is not None:
        runner, graph = make(size, want_graph, first), want_graph
    else:
        runner, graph = _with_graph_if_accepted(lambda g: make(size, g), size, want_graph,
                                                graph_required)
    return [runner, *(make(size, graph) for _ in range(count - 1))], graph


def _replace_runners(bucket: Bucket, replacements: list[BucketRunner]) -> None:
    """Swap a bucket's runners for new ones (warm-up: nothing runs meanwhile)."""
    while not bucket.idle.empty():
        bucket.idle.get()
    for old in bucket.runners:
        old.close()
    bucket.runners[:] = replacements
    for runner in replacements:
        bucket.idle.put(runner)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _at(spec: TensorSpec, size: int) -> TensorSpec:
    return TensorSpec(spec.name, (size, *spec.shape[1:]), spec.dtype)


def run_with_binding(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                     names: list[str], device: str) -> list[Any]:
    """Run with IO binding: inputs copied from host once, outputs bound by name on ``device``
    and copied back to host."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, device)
    session.run_with_iobinding(binding)
    return list(binding.copy_outputs_to_cpu())
