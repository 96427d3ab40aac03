"""onnxruntime sessions: how many threads, which providers with which options, and for a
bucket its fixed batch size; and which providers really run, since onnxruntime's Python
wrapper retries a failed provider silently (TensorRT without libnvinfer becomes CUDA at its
default options, CUDA without its libraries the CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

import onnxruntime as ort

from app.config import Settings
from app.engine import providers as prov
from app.engine.buckets import resolve_buckets
from app.engine.model import ModelInfo, load_error
from app.engine.precision import to_fp16

log = logging.getLogger("dfine.engine")

ModelSource = Path | bytes  # a file, or a model converted in memory (fp16)


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


@dataclass(frozen=True)
class SessionConfig:
    """One session: its providers and their options, threads, and for a bucket its batch."""

    providers: list[prov.ProviderSpec]
    threads: int = 0
    spin: bool = True
    batch_dim: str | None = None  # the model's symbolic batch axis
    bucket: int | None = None  # fix that axis to this size (a bucket's session)


def session_options(config: SessionConfig,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                    ) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if config.threads:
        options.intra_op_num_threads = config.threads
    if not config.spin:  # idle pool threads sleep instead of spinning on cores others need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if config.bucket is not None and config.batch_dim:
        # With the batch axis known, onnxruntime folds the export's shape arithmetic (Shape,
        # Gather, Range, ScatterND...: D-FINE-N 1362 nodes -> 819). Left dynamic, those nodes
        # run on the CPU with copies to and from the GPU, and the CUDA provider refuses to
        # capture a graph with any copy node in it (inference_session.cc).
        options.add_free_dimension_override_by_name(config.batch_dim, config.bucket)
    options.log_severity_level = 3
    return options


def open_session(model: ModelSource, config: SessionConfig) -> ort.InferenceSession:
    where = model if isinstance(model, Path) else "the converted model"
    try:
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model,
                                    session_options(config),
                                    providers=[name for name, _ in config.providers],
                                    provider_options=[opts for _, opts in config.providers])
    except Exception as exc:  # onnxruntime raises its own exception types, not one base class
        raise load_error(where, exc) from exc


SessionFactory = Callable[[ModelSource, SessionConfig], ort.InferenceSession]


def model_source(path: Path, precision: str, providers: list[str]) -> ModelSource:
    """What the sessions load: the file, or for fp16 on CUDA (and the CPU, to check accuracy)
    the model converted in memory."""
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


@dataclass(frozen=True)
class EnginePlan:
    """How the engine runs on the providers that really run: buckets or one dynamic session,
    CUDA graphs or not, threads."""

    providers: list[str]
    parallel: Parallelism
    buckets: tuple[int, ...] | None
    cuda_graph: bool  # wanted: the CUDA provider with buckets and CUDA_GRAPH not off
    gpu: prov.GpuOptions

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] != prov.CPU

    def config(self, bucket: int | None = None, cuda_graph: bool = False,
               cpu_threads: int | None = None, batch_dim: str | None = None) -> SessionConfig:
        """A session's config: the dynamic one (no bucket), a bucket's, or with
        ``cpu_threads`` a CPU session of that many threads (the solo session of lone runs)."""
        if cpu_threads is not None:
            return SessionConfig([(prov.CPU, {})], cpu_threads, self.parallel.spin)
        options = replace(self.gpu, bucket=bucket, cuda_graph=cuda_graph)
        return SessionConfig(prov.provider_specs(self.providers, options), self.parallel.threads,
                             self.parallel.spin, batch_dim, bucket)


def plan_engine(settings: Settings, info: ModelInfo, providers: list[str]) -> EnginePlan:
    """The plan for ``providers`` (those that run, not those asked for): buckets by default
    only where the CUDA provider runs the model."""
    parallel = parallelism(settings, providers, info.fixed_batch)
    on_cuda = providers[0] == prov.CUDA
    buckets = resolve_buckets(settings.bucket_sizes, parallel.max_batch_size, on_cuda,
                              info.fixed_batch)
    gpu = prov.GpuOptions(
        max_batch_size=parallel.max_batch_size, input_height=info.input_height,
        input_width=info.input_width, trt_fp16=settings.trt_fp16,
        trt_cache_dir=settings.trt_cache_dir,
        sizes_input="orig_target_sizes" if info.layout == "official" else None,
        image_input=info.image_input)
    want_graph = settings.cuda_graph != "off" and on_cuda and buckets is not None
    return EnginePlan(providers, parallel, buckets, want_graph, gpu)


class HasProviders(Protocol):
    def get_providers(self) -> list[str]: ...


S = TypeVar("S", bound=HasProviders)


def settle_providers(asked: list[str], explicit: bool, open_first: Callable[[list[str]], S]
                     ) -> tuple[list[str], S]:
    """The providers that really run the model, and the first session opened with them.

    ``open_first(providers)`` opens the first session a plan for ``providers`` needs. When
    onnxruntime enabled other providers than the first asked for (its silent fallback), the
    plan is made again for those that run, so that, say, TensorRT falling back to CUDA gets
    CUDA's buckets and options rather than one dynamic session at CUDA's defaults. An explicit
    list must run in full (ModelLoadError); ``auto`` takes the best that works, with a warning.
    """
    providers = list(asked)
    while True:
        session = open_first(providers)
        in_use = list(session.get_providers())
        missing = prov.missing_in_use(providers, in_use, explicit)
        if not missing or in_use[:1] == providers[:1]:
            if missing:
                log.warning("providers %s unavailable at run time; serving with %s",
                            missing, in_use)
            return in_use, session
        log.warning("asked for %s, onnxruntime runs %s: planning again for those", providers,
                    in_use)
        providers = [p for p in providers if p in in_use] or [prov.CPU]
