"""onnxruntime execution providers: which to ask for, with which options, and a check that
onnxruntime really uses them (it falls back to CPU silently when a GPU library is missing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelLoadError

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_NAMES = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}
AUTO_ORDER = (TENSORRT, CUDA, CPU)

ProviderSpec = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class GpuOptions:
    max_batch_size: int
    input_height: int
    input_width: int
    trt_fp16: bool
    trt_cache_dir: Path
    sizes_input: str | None  # "orig_target_sizes" for the official layout
    image_input: str = "images"
    device_id: int = 0
    bucket: int | None = None  # the one batch size a bucket's session runs
    cuda_graph: bool = False


def choose_providers(requested: list[str], available: list[str]) -> list[str]:
    """onnxruntime provider names in priority order.

    ``auto`` takes TensorRT, then CUDA, then CPU, among those available. An explicit list is
    honoured as given; a requested provider that onnxruntime lacks is an error, not a fallback.
    """
    if requested == ["auto"]:
        return [p for p in AUTO_ORDER if p in available] or [CPU]
    chosen = [ORT_NAMES[name] for name in requested]
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ModelLoadError(
            f"provider(s) {missing} requested but onnxruntime offers only {available}")
    return chosen


def _profile(opts: GpuOptions, batch: int) -> str:
    shapes = [f"{opts.image_input}:{batch}x3x{opts.input_height}x{opts.input_width}"]
    if opts.sizes_input:
        shapes.append(f"{opts.sizes_input}:{batch}x2")
    return ",".join(shapes)


def tensorrt_options(opts: GpuOptions) -> dict[str, Any]:
    """FP16, engine and timing caches on disk, and one profile: 1..max batch, or a bucket's
    session's own batch size alone.

    The profile covers every batch the session can be given, so TensorRT builds its engine
    once at warm-up (or loads it from the cache), never on a user's request.
    """
    cache = str(opts.trt_cache_dir)
    low, high = (1, opts.max_batch_size) if opts.bucket is None else (opts.bucket, opts.bucket)
    return {
        "device_id": opts.device_id,
        "trt_fp16_enable": opts.trt_fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_max_workspace_size": 2 * 1024**3,
        "trt_profile_min_shapes": _profile(opts, low),
        "trt_profile_opt_shapes": _profile(opts, high),
        "trt_profile_max_shapes": _profile(opts, high),
    }


def cuda_options(opts: GpuOptions) -> dict[str, Any]:
    options: dict[str, Any] = {
        "device_id": opts.device_id,
        # Input shapes repeat (one per batch size), so searching once for the best
        # convolution algorithm pays off.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if opts.cuda_graph:
        # Replays the whole run as one graph launch; needs inputs and outputs bound at fixed
        # device addresses (app.engine.runner) and every node on the CUDA provider.
        options["enable_cuda_graph"] = "1"
    return options


def provider_specs(providers: list[str], opts: GpuOptions) -> list[ProviderSpec]:
    specs: list[ProviderSpec] = []
    for name in providers:
        if name == TENSORRT:
            specs.append((name, tensorrt_options(opts)))
        elif name == CUDA:
            specs.append((name, cuda_options(opts)))
        else:
            specs.append((name, {}))
    return specs


def missing_in_use(requested: list[str], in_use: list[str], explicit: bool) -> list[str]:
    """Providers asked for that the session did not enable.

    An explicit list must be honoured in full: the caller refuses to start. With ``auto`` the
    caller only warns: auto means "the best that works here", and TensorRT without its
    libraries, say, degrades to CUDA.
    """
    missing = [p for p in requested if p not in in_use]
    if explicit and missing:
        raise ModelLoadError(
            f"onnxruntime did not enable {missing} (in use: {in_use}); check the GPU libraries "
            "(CUDA, cuDNN, TensorRT) and the driver")
    return missing
