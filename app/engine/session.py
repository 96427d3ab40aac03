"""The onnxruntime engine: loads a model, finds its layout, and runs batches of prepared images.

It knows nothing of HTTP or batching: ``run`` takes an (n, 3, H, W) batch and returns the
official layout's three arrays, whatever the model's own layout.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from app.config import Settings
from app.engine import providers as prov
from app.engine.buckets import bucket_for, resolve_buckets
from app.engine.layouts import (
    OFFICIAL_INPUTS,
    OFFICIAL_OUTPUTS,
    RAW_BOXES_OUTPUT,
    RAW_IMAGE_INPUTS,
    RAW_LOGITS_OUTPUTS,
    Layout,
    official_class_count,
    raw_head_to_official,
)
from app.engine.memory import MemoryKind, memory_used_bytes
from app.engine.precision import to_fp16
from app.engine.runner import BucketRunner, Device, TensorSpec
from app.errors import ModelLoadError
from app.labels import resolve_labels

log = logging.getLogger("dfine.engine")

DEFAULT_INPUT_SIZE = 640  # the official models' size, for exports with a dynamic H and W
TOP_K = 300


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def is_identity(self) -> bool:
        return self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    layout: Layout
    input_width: int
    input_height: int
    fixed_batch: int | None  # the model's own batch size, when its batch axis is not dynamic
    labels: list[str] | None
    providers: list[str]
    resize: str = "stretch"
    normalization: Normalization = field(default_factory=Normalization)
    metadata: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    logits_output: str = ""  # raw head: which of RAW_LOGITS_OUTPUTS the model has
    image_input: str = "images"


@dataclass
class Detections:
    """A batch in the official layout: labels (n, k), boxes (n, k, 4) xyxy in the pixels of the
    sizes passed in, scores (n, k) sorted descending."""

    labels: npt.NDArray[np.int64]
    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]


def _detect_layout(inputs: list[str], outputs: list[str]) -> Layout:
    if set(inputs) == set(OFFICIAL_INPUTS) and set(OFFICIAL_OUTPUTS) <= set(outputs):
        return "official"
    if (len(inputs) == 1 and inputs[0] in RAW_IMAGE_INPUTS and RAW_BOXES_OUTPUT in outputs
            and any(name in outputs for name in RAW_LOGITS_OUTPUTS)):
        return "raw_head"
    raise ModelLoadError(
        f"inputs {inputs} and outputs {outputs} match no known layout: expected the official "
        f"D-FINE export (inputs {list(OFFICIAL_INPUTS)}, outputs {list(OFFICIAL_OUTPUTS)}) or a "
        f"raw head (input images or pixel_values; outputs logits or pred_logits, and pred_boxes)")


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _parse_normalization(text: str | None) -> Normalization:
    if not text or text == "none":
        return Normalization()
    try:
        value = json.loads(text)
        mean = tuple(float(v) for v in value["mean"])
        std = tuple(float(v) for v in value["std"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"model metadata dfine.normalize is not valid: {text!r}") from exc
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelLoadError(f"model metadata dfine.normalize needs 3 means and 3 stds: {text!r}")
    return Normalization((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


@dataclass(frozen=True)
class Parallelism:
    instances: int  # engine runs in flight
    threads: int  # onnxruntime intra-op threads per run; 0: onnxruntime's default
    max_batch_size: int
    solo_threads: int = 0  # threads of a run that has the CPU to itself; 0: no such session
    spin: bool = True  # onnxruntime's idle pool threads spin (CPU) or sleep (GPU)
    decode_workers: int = 4


def parallelism(settings: Settings, providers: list[str], fixed_batch: int | None
                ) -> Parallelism:
    """Resolve the 0 = auto settings for the providers in use.

    Measured here (2 cores, D-FINE-N at 320, in-process, `dfine-serve bench`): on a CPU, runs
    that each use one core beat one run spread over both (2 x 1 thread: 72-76 images/s; 1 x 2
    threads: 60), and batching does not pay (batch 1: 76, 2: 73, 4: 72, 8: 65 images/s) while
    it costs memory and latency. One thread a run is slow for a lone request, though (27 ms
    against 18 with both cores), so a run that starts while no other is running uses a second
    session with all the cores. Decoding gets at most 4 threads: the engine needs the cores.

    On a GPU a batch uses the device far better than one image (D-FINE-L 640 on an H200: 77
    images/s at batch 1, 325 at 8, 398 at 32), one run at a time keeps it busy while the next
    batch forms, and the CPU is free for decoding: one decode thread per core. onnxruntime's
    CPU threads there only run a few shape ops, so one thread that sleeps when idle (its
    default, a spinning pool on every core, cost 13-25 ms of CPU per request on 16 cores).
    """
    cores = os.cpu_count() or 1
    on_cpu = providers[:1] == [prov.CPU]
    instances = settings.instances or (cores if on_cpu else 1)
    threads = settings.intra_op_threads or (max(1, cores // instances) if on_cpu else 1)
    batch = fixed_batch or settings.max_batch_size or (1 if on_cpu else 32)
    solo = cores if on_cpu and not settings.intra_op_threads and threads < cores else 0
    decode = settings.decode_workers or (min(cores, 4) if on_cpu else cores)
    return Parallelism(instances, threads, batch, solo, spin=on_cpu, decode_workers=decode)


ModelSource = Path | bytes  # a file, or a model converted in memory (fp16)


def _open_session(model: ModelSource, threads: int, specs: list[prov.ProviderSpec],
                  spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:  # idle pool threads sleep instead of spinning on cores others need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    names = [name for name, _ in specs]
    where = model if isinstance(model, Path) else "the converted model"
    try:
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                    providers=names,
                                    provider_options=[opts for _, opts in specs])
    except Exception as exc:  # onnxruntime raises its own exception types, not one base class
        text = str(exc)
        if "protobuf" in text.lower() or "INVALID_PROTOBUF" in text:
            raise ModelLoadError(f"{where} is not a valid ONNX model") from exc
        raise ModelLoadError(f"onnxruntime cannot load {where}: {text.splitlines()[0]}"
                             ) from exc


def _model_source(path: Path, precision: str, providers: list[str]) -> ModelSource:
    if precision == "fp32":
        return path
    if providers[0] == prov.TENSORRT:
        log.info("precision fp16: TensorRT builds its own fp16 engines (TRT_FP16); the model "
                 "is given to it unconverted")
        return path
    if providers[0] == prov.CPU:
        log.warning("precision fp16 on the CPU: onnxruntime runs most fp16 nodes through casts "
                    "to fp32, so this only checks accuracy; it is not faster")
    return to_fp16(path)


@dataclass
class _Bucket:
    """A bucket's runners (one per engine instance) and what they cost."""

    size: int
    idle: queue.SimpleQueue[BucketRunner]
    runners: list[BucketRunner]
    cuda_graph: bool
    memory_bytes: int | None = None


class OnnxEngine:
    """Runs batches of prepared images; ``run`` is thread-safe.

    Two ways to run. Without buckets (the CPU default): one session for every batch size, and
    on a CPU a second one with all the cores for lone runs. With buckets: a session per bucket
    and engine instance, each fed one input shape through buffers bound once
    (app.engine.runner), a batch padded to its bucket.
    """

    def __init__(self, info: ModelInfo, parallel: Parallelism | None = None,
                 session: ort.InferenceSession | None = None,
                 solo_session: ort.InferenceSession | None = None,
                 buckets: list[_Bucket] | None = None,
                 remake: Callable[[int, bool], BucketRunner] | None = None,
                 graph_required: bool = False) -> None:
        self.session = session
        self.solo_session = solo_session
        self.info = info
        self.parallel = parallel or Parallelism(1, 0, info.fixed_batch or 1)
        self._buckets = {b.size: b for b in buckets or []}
        self._bucket_sizes = tuple(sorted(self._buckets))
        self._remake = remake  # a bucket's runner again, without a CUDA graph (fallback)
        self._graph_required = graph_required
        self._running = 0
        self._running_lock = threading.Lock()
        self._outputs = _output_names(info.layout, info.logits_output)
        # Without buckets on a GPU (TensorRT's dynamic profile), IO binding names every output
        # instead of trusting their order and leaves them on the device until copied back.
        self._bind_device = "cuda" if self.on_gpu else None

    @property
    def buckets(self) -> tuple[int, ...] | None:
        """The batch sizes runs are padded to; None: any size runs as it is."""
        return self._bucket_sizes or None

    @classmethod
    def load(cls, settings: Settings) -> OnnxEngine:
        path = settings.model_path
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        requested = prov.choose_providers(settings.provider_list, ort.get_available_providers())
        if requested != [prov.CPU] and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu[cuda,cudnn] ships CUDA and cuDNN as pip wheels: load them from
            # site-packages, so the image needs no LD_LIBRARY_PATH for them.
            ort.preload_dlls()
        # Probe the model on the CPU first: the GPU sessions need its input names and size,
        # and the bucket runners the shapes of its outputs.
        parallel = parallelism(settings, requested, None)
        probe = _open_session(path, parallel.threads, [(prov.CPU, {})])
        inputs = [i.name for i in probe.get_inputs()]
        outputs = [o.name for o in probe.get_outputs()]
        layout = _detect_layout(inputs, outputs)
        image_input = probe.get_inputs()[inputs.index("images" if "images" in inputs
                                                      else inputs[0])]
        metadata = dict(probe.get_modelmeta().custom_metadata_map)
        batch_dim, _, height_dim, width_dim = image_input.shape
        if isinstance(height_dim, int) and isinstance(width_dim, int):
            width, height = width_dim, height_dim
        elif "dfine.input_size" in metadata:
            width, height = _parse_size(metadata["dfine.input_size"])
        else:
            width = height = DEFAULT_INPUT_SIZE
        num_classes = official_class_count(path) if layout == "official" else None
        logits_output = next((n for n in RAW_LOGITS_OUTPUTS if n in outputs), "")
        if layout == "raw_head":
            logits = next(o for o in probe.get_outputs() if o.name == logits_output)
            num_classes = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        labels = resolve_labels(metadata, settings.labels_path, num_classes)
        fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        parallel = parallelism(settings, requested, fixed_batch)
        on_gpu = requested[0] != prov.CPU
        bucket_sizes = resolve_buckets(settings.bucket_sizes, parallel.max_batch_size,
                                       requested[0] == prov.CUDA, fixed_batch)
        source = _model_source(path, settings.precision, requested)
        gpu = prov.GpuOptions(
            max_batch_size=parallel.max_batch_size, input_height=height, input_width=width,
            trt_fp16=settings.trt_fp16, trt_cache_dir=settings.trt_cache_dir,
            sizes_input="orig_target_sizes" if layout == "official" else None,
            image_input=image_input.name)
        if on_gpu:
            settings.trt_cache_dir.mkdir(parents=True, exist_ok=True)

        def open_session(bucket: int | None = None, cuda_graph: bool = False
                         ) -> ort.InferenceSession:
            if not on_gpu and not isinstance(source, bytes) and bucket is None:
                return probe
            options = replace(gpu, bucket=bucket, cuda_graph=cuda_graph)
            return _open_session(source, parallel.threads,
                                 prov.provider_specs(requested, options), spin=parallel.spin)

        session = solo = None
        buckets: list[_Bucket] = []
        remake = None
        if bucket_sizes is None:
            session = open_session()
            in_use = list(session.get_providers())
            if parallel.solo_threads:
                solo = _open_session(source, parallel.solo_threads, [(prov.CPU, {})])
        else:
            image_spec = TensorSpec(image_input.name, (1, 3, height, width), np.float32)
            sizes_spec = TensorSpec("orig_target_sizes", (1, 2), np.int64)
            input_specs = [image_spec, sizes_spec] if layout == "official" else [image_spec]
            output_specs = _output_specs(probe, input_specs,
                                         _output_names(layout, logits_output), fixed_batch or 1)
            device: Device = "cuda" if on_gpu else "cpu"
            fill = {"orig_target_sizes": np.asarray([width, height], np.int64)}

            def make_runner(size: int, cuda_graph: bool) -> BucketRunner:
                return BucketRunner(open_session(size, cuda_graph), size,
                                    [_at(s, size) for s in input_specs],
                                    [_at(s, size) for s in output_specs], device, fill=fill)

            remake = make_runner
            want_graph = settings.cuda_graph != "off" and requested[0] == prov.CUDA
            memory_kind: MemoryKind = "gpu" if on_gpu else "host"
            for size in bucket_sizes:
                before = memory_used_bytes(memory_kind)
                runners, graph = _make_runners(make_runner, size, parallel.instances,
                                               want_graph, settings.cuda_graph == "on")
                after = memory_used_bytes(memory_kind)
                idle: queue.SimpleQueue[BucketRunner] = queue.SimpleQueue()
                for runner in runners:
                    idle.put(runner)
                buckets.append(_Bucket(size, idle, runners, graph,
                                       None if before is None or after is None
                                       else after - before))
            in_use = list(buckets[0].runners[0].session.get_providers())
        explicit = settings.provider_list != ["auto"]
        missing = prov.missing_in_use(requested, in_use, explicit)
        if missing:
            log.warning("providers %s unavailable at run time; serving with %s", missing, in_use)
        resize = metadata.get("dfine.resize", "stretch")
        if resize not in ("stretch", "letterbox"):
            raise ModelLoadError(f"model metadata dfine.resize is {resize!r}: stretch/letterbox")
        info = ModelInfo(
            name=path.stem, path=path, layout=layout, input_width=width, input_height=height,
            fixed_batch=fixed_batch, labels=labels, providers=in_use, resize=resize,
            normalization=_parse_normalization(metadata.get("dfine.normalize")),
            metadata=metadata, precision=settings.precision, logits_output=logits_output,
            image_input=image_input.name)
        log.info("loaded %s: layout %s, input %dx%d, batch %s, %s classes, providers %s, "
                 "precision %s, %d instance(s) x %s thread(s), batches of up to %d, buckets %s",
                 path, layout, width, height, fixed_batch or "dynamic",
                 len(labels) if labels else "unnamed", in_use, settings.precision,
                 parallel.instances, parallel.threads or "default", parallel.max_batch_size,
                 ",".join(str(b.size) for b in buckets) or "none")
        return cls(info, parallel, session, solo, buckets, remake,
                   graph_required=settings.cuda_graph == "on")

    def run(self, images: npt.NDArray[np.float32], sizes_wh: npt.NDArray[np.int64],
            may_use_all_cores: bool = True) -> Detections:
        """images (n, 3, H, W) float32; sizes_wh (n, 2) int64 -> detections for n images.

        ``may_use_all_cores``: the caller expects no other run soon (nothing queued), so a run
        with no other in flight may take the solo session's threads."""
        n = images.shape[0]
        if self.info.layout == "official":
            feeds: dict[str, np.ndarray] = {"images": images, "orig_target_sizes": sizes_wh}
        else:
            feeds = {self.info.image_input: images}
        if self._buckets:
            bucket = self._buckets[bucket_for(n, self._bucket_sizes)]
            runner = bucket.idle.get()  # one per instance: free unless a run hung
            try:
                named = runner.run(feeds)
            finally:
                bucket.idle.put(runner)
            results = [named[name] for name in self._outputs]
        else:
            results = self._run(feeds, self._outputs, may_use_all_cores)
        if self.info.layout == "official":
            labels, boxes, scores = results
        else:
            labels, boxes, scores = raw_head_to_official(results[0], results[1], sizes_wh, TOP_K)
        return Detections(labels[:n].astype(np.int64, copy=False),
                          boxes[:n].astype(np.float32, copy=False),
                          scores[:n].astype(np.float32, copy=False))

    def _run(self, feeds: dict[str, np.ndarray], names: list[str], may_use_all_cores: bool
             ) -> list[Any]:
        assert self.session is not None
        with self._running_lock:
            alone = self._running == 0 and may_use_all_cores
            self._running += 1
        try:
            if alone and self.solo_session is not None:
                return list(self.solo_session.run(names, feeds))
            if self._bind_device is None:
                return list(self.session.run(names, feeds))
            return run_with_binding(self.session, feeds, names, self._bind_device)
        finally:
            with self._running_lock:
                self._running -= 1

    def warm_up(self) -> None:
        """Run every batch size (every bucket's every runner) before the first request, so no
        user request pays for a first run: cuDNN's algorithm search, CUDA graph capture,
        TensorRT's engine build or cache load, memory arena growth."""
        h, w = self.info.input_height, self.info.input_width
        if not self._buckets:
            for n in range(1, self.parallel.max_batch_size + 1):
                images = np.zeros((n, 3, h, w), np.float32)
                sizes = np.tile(np.asarray([[w, h]], np.int64), (n, 1))
                self.run(images, sizes)  # alone: with the solo session, if there is one
                if self.solo_session is not None:
                    self.run(images, sizes, may_use_all_cores=False)
            return
        kind: MemoryKind = "gpu" if self.on_gpu else "host"
        for bucket in self._buckets.values():
            before = memory_used_bytes(kind)
            for index, runner in enumerate(bucket.runners):
                bucket.runners[index] = self._warm_runner(bucket, runner)
            after = memory_used_bytes(kind)
            if bucket.memory_bytes is not None and before is not None and after is not None:
                bucket.memory_bytes += after - before
        log.info("buckets ready: %s (%s memory)", ", ".join(
            f"{b.size}: {_mb(b.memory_bytes)} MB{' with CUDA graph' if b.cuda_graph else ''}"
            for b in self._buckets.values()), kind)

    def _warm_runner(self, bucket: _Bucket, runner: BucketRunner) -> BucketRunner:
        """Warm-up runs (onnxruntime captures a CUDA graph after its first runs); a runner whose
        graph fails is replaced by one without (or the failure raised, with CUDA_GRAPH=on)."""
        h, w = self.info.input_height, self.info.input_width
        feeds = {self.info.image_input: np.zeros((bucket.size, 3, h, w), np.float32)}
        if self.info.layout == "official":
            feeds["orig_target_sizes"] = np.tile(np.asarray([[w, h]], np.int64),
                                                 (bucket.size, 1))
        try:
            for _ in range(WARM_UP_RUNS):
                runner.run(feeds)
            return runner
        except Exception as exc:
            if not bucket.cuda_graph or self._remake is None:
                raise
            if self._graph_required:
                raise ModelLoadError(f"CUDA graph of bucket {bucket.size} failed: {exc}") from exc
            log.warning("bucket %d: CUDA graph failed (%s); running it without", bucket.size,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        replacement = self._remake(bucket.size, False)
        bucket.cuda_graph = False
        _swap_idle(bucket, runner, replacement)
        for _ in range(WARM_UP_RUNS):
            replacement.run(feeds)
        return replacement

    @property
    def on_gpu(self) -> bool:
        return self.info.providers[:1] != [prov.CPU]

    def report(self) -> dict[str, Any]:
        """How the engine runs, for /model and the log."""
        return {
            "precision": self.info.precision,
            "instances": self.parallel.instances,
            "intra_op_threads": self.parallel.threads,
            "decode_workers": self.parallel.decode_workers,
            "memory_kind": "gpu" if self.on_gpu else "host",
            "buckets": [{"size": b.size, "sessions": len(b.runners), "cuda_graph": b.cuda_graph,
                         "memory_mb": _mb(b.memory_bytes)} for b in self._buckets.values()],
        }


WARM_UP_RUNS = 3


def _output_names(layout: Layout, logits_output: str) -> list[str]:
    """The outputs a run asks for, by name: the official three, or a raw head's two."""
    return [*OFFICIAL_OUTPUTS] if layout == "official" else [logits_output, RAW_BOXES_OUTPUT]


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


def _at(spec: TensorSpec, size: int) -> TensorSpec:
    return TensorSpec(spec.name, (size, *spec.shape[1:]), spec.dtype)


def _output_specs(probe: ort.InferenceSession, inputs: list[TensorSpec], names: list[str],
                  batch: int) -> list[TensorSpec]:
    """The outputs' shapes and types, from one run of the probe (exports name their output
    sizes symbolically, e.g. labels [N, "Modlabels_dim_1"])."""
    feeds: dict[str, np.ndarray] = {spec.name: np.zeros((batch, *spec.shape[1:]), spec.dtype)
                                    for spec in inputs}
    if "orig_target_sizes" in feeds:
        feeds["orig_target_sizes"][:] = 1
    arrays = probe.run(names, feeds)
    return [TensorSpec(name, tuple(array.shape), array.dtype.type)
            for name, array in zip(names, arrays)]


def _make_runners(make: Callable[[int, bool], BucketRunner], size: int, count: int,
                  want_graph: bool, graph_required: bool) -> tuple[list[BucketRunner], bool]:
    """``count`` runners of a bucket, with CUDA graphs if wanted and onnxruntime accepts
    them for this model (it refuses at session creation when a node is not on CUDA)."""
    if want_graph:
        try:
            return [make(size, True) for _ in range(count)], True
        except ModelLoadError as exc:
            if graph_required:
                raise
            log.warning("bucket %d: no CUDA graph (%s); running it without", size, exc)
    return [make(size, False) for _ in range(count)], False


def _swap_idle(bucket: _Bucket, old: BucketRunner, new: BucketRunner) -> None:
    """Put ``new`` in ``old``'s place in the bucket's idle queue (warm-up: nothing runs)."""
    kept = []
    while not bucket.idle.empty():
        runner = bucket.idle.get()
        kept.append(new if runner is old else runner)
    for runner in kept:
        bucket.idle.put(runner)


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
