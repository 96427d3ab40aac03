"""A loaded model version's configuration in Triton's ``ModelConfig`` schema (the extension
``model_configuration``), filled from how the service really runs it: its batch size, its
inputs and outputs, its batcher (buckets, MAX_DELAY_MS), its engine instances and where they
run, and the version policy its repository gives. One dict, sent as-is over REST and parsed
into the protobuf over gRPC, so the two forms never differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine.providers import CPU
from app.model_repository import (
    MAX_SETTINGS_BYTES,
    MODEL_FILE,
    SETTINGS_FILE,
    VersionPolicy,
    model_directory,
)
from app.service import Detector


def policy_json(policy: VersionPolicy) -> dict[str, Any]:
    """Triton's ``version_policy``: one of ``latest``, ``specific`` or ``all``."""
    if policy.specific is not None:
        return {"specific": {"versions": sorted(policy.specific)}}
    if policy.latest is not None:
        return {"latest": {"num_versions": policy.latest}}
    return {"all": {}}


def version_policy(settings: Settings, name: str) -> VersionPolicy:
    """The model's version policy as its repository gives it (settings.json); the default
    (the latest version) for MODEL_PATH or where the file says none. Reads a file: call it off
    the event loop. A file that no longer parses gives the default: a model whose file is
    wrong is not loaded again until it is fixed, so the versions served follow the default."""
    root = settings.model_repository
    if root is None:
        return VersionPolicy()
    try:
        path: Path = model_directory(root, name) / SETTINGS_FILE
        if not path.is_file() or path.stat().st_size > MAX_SETTINGS_BYTES:
            return VersionPolicy()
        document = json.loads(path.read_bytes())
        if isinstance(document, dict) and "version_policy" in document:
            return VersionPolicy.parse(document["version_policy"])
    except (OSError, ValueError):
        pass
    return VersionPolicy()


def _tensor(name: str, data_type: str, dims: list[int], **more: Any) -> dict[str, Any]:
    return {"name": name, "data_type": data_type, "dims": dims, **more}


def model_config(detector: Detector, policy: VersionPolicy) -> dict[str, Any]:
    """The version's ModelConfig (dims without the batch dimension: max_batch_size > 0).
    Inputs are those of the model metadata, each optional (a request sends the image files, or
    the preprocessed ``images`` with or without ``orig_target_sizes``); the one image of a
    batch element is a BYTES element of shape [], given as dims [1] reshaped to []."""
    engine, settings = detector.engine, detector.settings
    info = engine.info
    on_gpu = info.providers[:1] != [CPU]
    group: dict[str, Any] = {"name": f"{info.name}_0", "kind": "KIND_GPU" if on_gpu
                             else "KIND_CPU", "count": engine.parallel.instances}
    if on_gpu:
        group["gpus"] = [0]  # the service runs on device 0
    return {
        "name": info.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": policy_json(policy),
        # What one request may carry (its images are batched with others' up to the engine's
        # own batch size, below): perf_analyzer's -b goes up to this.
        "max_batch_size": settings.max_batch_images,
        "input": [
            _tensor("image", "TYPE_STRING", [1], reshape={"shape": []}, optional=True),
            _tensor("images", "TYPE_FP32", [3, info.input_height, info.input_width],
                    format="FORMAT_NCHW", optional=True),
            _tensor("orig_target_sizes", "TYPE_INT64", [2], optional=True),
        ],
        "output": [
            _tensor("labels", "TYPE_INT64", [-1]),
            _tensor("boxes", "TYPE_FP32", [-1, 4]),
            _tensor("scores", "TYPE_FP32", [-1]),
            _tensor("names", "TYPE_STRING", [-1]),
        ],
        "dynamic_batching": {
            "preferred_batch_size": list(engine.buckets or (detector.max_batch_size,)),
            "max_queue_delay_microseconds": round(settings.max_delay_ms * 1000),
            "preserve_ordering": False, "priority_levels": 0, "default_priority_level": 0},
        "instance_group": [group],
        "default_model_filename": MODEL_FILE,
        "parameters": {},
        "model_warmup": [],
    }
