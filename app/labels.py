"""Class names: model metadata, a labels file, or COCO's 80 names for an 80-class model."""

from __future__ import annotations

import json
from pathlib import Path

from app.errors import ModelLoadError

# COCO 2017 detection classes in the order of D-FINE's contiguous labels 0..79.
COCO_80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def read_labels_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels file {path}: {exc.strerror}") from exc
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise ModelLoadError(f"labels file {path} holds no names")
    return names


def resolve_labels(metadata: dict[str, str], labels_path: Path | None,
                   num_classes: int | None) -> list[str] | None:
    """Names in priority order: labels file (a setting), ``dfine.labels`` metadata, COCO-80.

    ``num_classes``: what the model's graph says (a raw head's logits, an official export's
    constant divisor), or None when it does not say. A labels file or metadata of another
    length is an error, and so are metadata names that disagree with the labels file's count.
    Returns None when nothing names the classes: they are then called by their index.
    """
    if labels_path is not None:
        names = read_labels_file(labels_path)
        if num_classes is None and "dfine.labels" in metadata:
            num_classes = len(_metadata_names(metadata))
    elif "dfine.labels" in metadata:
        names = _metadata_names(metadata)
    elif num_classes in (80, None):
        # An official export does not say how many classes it has; COCO is the default.
        return list(COCO_80)
    else:
        return None
    if num_classes is not None and len(names) != num_classes:
        where = f"labels file {labels_path}" if labels_path else "model metadata dfine.labels"
        raise ModelLoadError(f"{where} names {len(names)} classes; the model has "
                             f"{num_classes}")
    return names


def _metadata_names(metadata: dict[str, str]) -> list[str]:
    try:
        return [str(n) for n in json.loads(metadata["dfine.labels"])]
    except (ValueError, TypeError) as exc:
        raise ModelLoadError("model metadata dfine.labels is not a JSON list") from exc


def label_name(names: list[str] | None, class_id: int) -> str:
    if names is not None and 0 <= class_id < len(names):
        return names[class_id]
    return str(class_id)
