"""The onnxruntime engine: loads a model, finds its layout, and runs batches of prepared images.

It knows nothing of HTTP or batching: ``run`` takes an (n, 3, H, W) batch and returns the
official layout's three arrays, whatever the model's own layout.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from app.config import Settings
from app.engine import providers as prov
from app.engine.layouts import (
    OFFICIAL_INPUTS,
    OFFICIAL_OUTPUTS,
    RAW_BOXES_OUTPUT,
    RAW_IMAGE_INPUTS,
    RAW_LOGITS_OUTPUTS,
    Layout,
    raw_head_to_official,
)
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


def parallelism(settings: Settings, providers: list[str], fixed_batch: int | None
                ) -> Parallelism:
    """Resolve the 0 = auto settings for the providers in use.

    Measured here (2 cores, D-FINE-N at 320, in-process, `dfine-serve bench`): on a CPU, runs
    that each use one core beat one run spread over both (2 x 1 thread: 72-76 images/s; 1 x 2
    threads: 60), and batching does not pay (batch 1: 76, 2: 73, 4: 72, 8: 65 images/s) while
    it costs memory and latency. One thread a run is slow for a lone request, though (27 ms
    against 18 with both cores), so a run that starts while no other is running uses a second
    session with all the cores. On a GPU a batch uses the device far better than one image,
    and one run at a time keeps it busy while the next batch forms.
    """
    cores = os.cpu_count() or 1
    on_cpu = providers[:1] == [prov.CPU]
    instances = settings.instances or (cores if on_cpu else 1)
    threads = settings.intra_op_threads or (max(1, cores // instances) if on_cpu else 0)
    batch = fixed_batch or settings.max_batch_size or (1 if on_cpu else 8)
    solo = cores if on_cpu and not settings.intra_op_threads and threads < cores else 0
    return Parallelism(instances, threads, batch, solo)


def _open_session(path: Path, threads: int, specs: list[prov.ProviderSpec],
                  spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:  # idle pool threads sleep instead of spinning on cores others need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    names = [name for name, _ in specs]
    try:
        return ort.InferenceSession(str(path), options, providers=names,
                                    provider_options=[opts for _, opts in specs])
    except Exception as exc:  # onnxruntime raises its own exception types, not one base class
        text = str(exc)
        if "protobuf" in text.lower() or "INVALID_PROTOBUF" in text:
            raise ModelLoadError(f"{path} is not a valid ONNX model") from exc
        raise ModelLoadError(f"onnxruntime cannot load {path}: {text.splitlines()[0]}") from exc


class OnnxEngine:
    """An onnxruntime session (and on a CPU, a second one for lone runs); ``run`` is
    thread-safe (onnxruntime sessions are)."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo,
                 parallel: Parallelism | None = None,
                 solo_session: ort.InferenceSession | None = None) -> None:
        self.session = session
        self.solo_session = solo_session
        self.info = info
        self.parallel = parallel or Parallelism(1, 0, info.fixed_batch or 1)
        self._running = 0
        self._running_lock = threading.Lock()
        self._inputs = [i.name for i in session.get_inputs()]
        self._outputs = [o.name for o in session.get_outputs()]
        self._logits_name = next((n for n in RAW_LOGITS_OUTPUTS if n in self._outputs), "")
        # IO binding names every output instead of trusting their order, and lets the CUDA
        # provider write results straight to pinned host memory.
        self._bind_device = "cuda" if prov.CUDA in info.providers[:1] else None

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
        # Probe the inputs on the CPU first: the TensorRT profile needs the input names and size.
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
        num_classes = None
        if layout == "raw_head":
            logits = next(o for o in probe.get_outputs() if o.name in RAW_LOGITS_OUTPUTS)
            num_classes = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        labels = resolve_labels(metadata, settings.labels_path, num_classes)
        fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        parallel = parallelism(settings, requested, fixed_batch)
        if requested == [prov.CPU]:
            session = probe
        else:
            settings.trt_cache_dir.mkdir(parents=True, exist_ok=True)
            gpu = prov.GpuOptions(
                max_batch_size=parallel.max_batch_size, input_height=height,
                input_width=width, trt_fp16=settings.trt_fp16,
                trt_cache_dir=settings.trt_cache_dir,
                sizes_input="orig_target_sizes" if layout == "official" else None,
                image_input=image_input.name)
            session = _open_session(path, parallel.threads,
                                    prov.provider_specs(requested, gpu))
        in_use = list(session.get_providers())
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
            metadata=metadata)
        log.info("loaded %s: layout %s, input %dx%d, batch %s, %s classes, providers %s, "
                 "%d instance(s) x %s thread(s), batches of up to %d", path, layout, width,
                 height, fixed_batch or "dynamic", len(labels) if labels else "unnamed", in_use,
                 parallel.instances, parallel.threads or "default", parallel.max_batch_size)
        solo = (_open_session(path, parallel.solo_threads, [(prov.CPU, {})], spin=True)
                if parallel.solo_threads else None)
        return cls(session, info, parallel, solo)

    def run(self, images: npt.NDArray[np.float32], sizes_wh: npt.NDArray[np.int64],
            may_use_all_cores: bool = True) -> Detections:
        """images (n, 3, H, W) float32; sizes_wh (n, 2) int64 -> detections for n images.

        ``may_use_all_cores``: the caller expects no other run soon (nothing queued), so a run
        with no other in flight may take the solo session's threads."""
        n = images.shape[0]
        fixed = self.info.fixed_batch
        if fixed is not None and n < fixed:  # pad a fixed-batch model's input
            images = np.concatenate([images, np.zeros((fixed - n, *images.shape[1:]),
                                                      images.dtype)])
            sizes_wh = np.concatenate([sizes_wh, np.ones((fixed - n, 2), sizes_wh.dtype)])
        if self.info.layout == "official":
            feeds: dict[str, np.ndarray] = {"images": images, "orig_target_sizes": sizes_wh}
            labels, boxes, scores = self._run(feeds, list(OFFICIAL_OUTPUTS), may_use_all_cores)
        else:
            logits, raw_boxes = self._run({self._inputs[0]: images},
                                          [self._logits_name, RAW_BOXES_OUTPUT],
                                          may_use_all_cores)
            labels, boxes, scores = raw_head_to_official(logits, raw_boxes, sizes_wh, TOP_K)
        return Detections(labels[:n].astype(np.int64, copy=False),
                          boxes[:n].astype(np.float32, copy=False),
                          scores[:n].astype(np.float32, copy=False))

    def _run(self, feeds: dict[str, np.ndarray], names: list[str], may_use_all_cores: bool
             ) -> list[Any]:
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

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Run every batch size once, so no user request pays for a first run (cuDNN algorithm
        search, TensorRT engine build or cache load, memory arena growth)."""
        h, w = self.info.input_height, self.info.input_width
        for n in batch_sizes:
            images = np.zeros((n, 3, h, w), np.float32)
            sizes = np.tile(np.asarray([[w, h]], np.int64), (n, 1))
            self.run(images, sizes)  # alone: with the solo session, if there is one
            if self.solo_session is not None:
                self.run(images, sizes, may_use_all_cores=False)


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
