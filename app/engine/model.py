"""What a model file is: its layout, input size, batch axis, classes and metadata, read once at
load from the file (a CPU session with no graph optimization: quick, and it validates the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from app.engine.layouts import (
    OFFICIAL_INPUTS,
    OFFICIAL_OUTPUTS,
    RAW_BOXES_OUTPUT,
    RAW_IMAGE_INPUTS,
    RAW_LOGITS_OUTPUTS,
    Layout,
    official_class_count,
)
from app.errors import ModelLoadError
from app.labels import resolve_labels

DEFAULT_INPUT_SIZE = 640  # the official models' size, for exports with a dynamic H and W


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
    providers: list[str]  # those running the model (set by the engine once it has loaded)
    resize: str = "stretch"
    normalization: Normalization = field(default_factory=Normalization)
    metadata: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    logits_output: str = ""  # raw head: which of RAW_LOGITS_OUTPUTS the model has
    image_input: str = "images"
    # The batch axis's symbolic name (exports call it "N" or "batch_size"): a bucket's session
    # fixes it, so that onnxruntime folds every shape computation. None: fixed or unnamed.
    batch_dim: str | None = None
    providers_asked: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        """The outputs a run asks for, by name: the official three, or a raw head's two."""
        return ([*OFFICIAL_OUTPUTS] if self.layout == "official"
                else [self.logits_output, RAW_BOXES_OUTPUT])

    @property
    def input_names(self) -> list[str]:
        return [*OFFICIAL_INPUTS] if self.layout == "official" else [self.image_input]


def detect_layout(inputs: list[str], outputs: list[str]) -> Layout:
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


def load_error(where: object, exc: Exception) -> ModelLoadError:
    """onnxruntime's exception (it has no one base class) as a startup error that says why."""
    text = str(exc)
    if "protobuf" in text.lower() or "INVALID_PROTOBUF" in text:
        return ModelLoadError(f"{where} is not a valid ONNX model")
    first = text.splitlines()[0] if text else type(exc).__name__
    return ModelLoadError(f"onnxruntime cannot load {where}: {first}")


def inspect_model(path: Path, labels_path: Path | None = None, name: str | None = None,
                  input_size: tuple[int, int] | None = None) -> ModelInfo:
    """The model's facts; ``providers`` is left empty for the engine to fill in. ``name``:
    what it is served as (default: the file's stem); ``input_size`` (width, height): for an
    export whose height and width are dynamic."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        probe = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise load_error(path, exc) from exc
    inputs = [i.name for i in probe.get_inputs()]
    outputs = [o.name for o in probe.get_outputs()]
    layout = detect_layout(inputs, outputs)
    image_input = probe.get_inputs()[inputs.index("images" if "images" in inputs else inputs[0])]
    metadata = dict(probe.get_modelmeta().custom_metadata_map)
    batch_dim, _, height_dim, width_dim = image_input.shape
    if isinstance(height_dim, int) and isinstance(width_dim, int):
        width, height = width_dim, height_dim
        if input_size is not None and input_size != (width, height):
            raise ModelLoadError(f"input size {input_size[0]}x{input_size[1]} was asked for, "
                                 f"but {path.name} is exported at {width}x{height} only")
    elif input_size is not None:
        width, height = input_size
    elif "dfine.input_size" in metadata:
        width, height = _parse_size(metadata["dfine.input_size"])
    else:
        width = height = DEFAULT_INPUT_SIZE
    num_classes = official_class_count(path) if layout == "official" else None
    logits_output = next((n for n in RAW_LOGITS_OUTPUTS if n in outputs), "")
    if layout == "raw_head":
        logits = next(o for o in probe.get_outputs() if o.name == logits_output)
        num_classes = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
    resize = metadata.get("dfine.resize", "stretch")
    if resize not in ("stretch", "letterbox"):
        raise ModelLoadError(f"model metadata dfine.resize is {resize!r}: stretch/letterbox")
    return ModelInfo(
        name=name or path.stem, path=path, layout=layout, input_width=width, input_height=height,
        fixed_batch=batch_dim if isinstance(batch_dim, int) else None,
        labels=resolve_labels(metadata, labels_path, num_classes), providers=[],
        resize=resize, normalization=_parse_normalization(metadata.get("dfine.normalize")),
        metadata=metadata, logits_output=logits_output, image_input=image_input.name,
        batch_dim=batch_dim if isinstance(batch_dim, str) and batch_dim else None)
