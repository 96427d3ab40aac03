"""Per-image postprocessing of the official layout: threshold, class filter, optional
duplicate removal, clip, name, round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from app.imaging import Letterbox
from app.labels import label_name


@dataclass(frozen=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels


def detection_json(d: Detection) -> dict[str, Any]:
    """A detection as the API answers it (``DetectionOut``), built directly: pydantic's
    validation of the service's own output is measurable per request."""
    return {"label": d.label, "class_id": d.class_id, "score": d.score,  # rounded by select
            "box": {"x1": d.box[0], "y1": d.box[1], "x2": d.box[2], "y2": d.box[3]}}


def select(
    labels: npt.NDArray[np.int64],  # (k,) class index
    boxes: npt.NDArray[np.float32],  # (k, 4) xyxy in the pixels of the size passed to the model
    scores: npt.NDArray[np.float32],  # (k,)
    width: int,
    height: int,
    names: list[str] | None,
    score_threshold: float,
    max_detections: int,
    class_ids: frozenset[int] | None = None,
    letterbox: Letterbox | None = None,
    clip: bool = True,
    dedupe_iou: float = 0.0,
) -> list[Detection]:
    """Detections sorted by score, descending; scores rounded to 5 decimals, coordinates to
    0.01 pixel.

    ``clip``: boxes clipped to the original image (the official pipeline does not clip).
    ``dedupe_iou`` > 0: of two detections of the same class whose boxes overlap by at least
    this IoU, only the higher-scored is kept. Off (0), the answer is the model's: the same box
    may come twice, with two labels or even with one, since top-k runs over queries x classes.
    """
    keep = scores >= score_threshold
    if class_ids is not None:
        keep &= np.isin(labels, np.fromiter(class_ids, np.int64, len(class_ids)))
    index = np.flatnonzero(keep)
    if not index.size:
        return []
    index = index[np.argsort(-scores[index], kind="stable")]
    picked = original_boxes(boxes[index], letterbox).astype(np.float64)
    if dedupe_iou > 0:
        kept = _dedupe(labels[index], picked, dedupe_iou)
        index, picked = index[kept], picked[kept]
    index, picked = index[:max_detections], picked[:max_detections]
    if clip:
        picked[:, 0::2] = picked[:, 0::2].clip(0, width)
        picked[:, 1::2] = picked[:, 1::2].clip(0, height)
    # Python numbers in one call per array, not one numpy scalar per value.
    return [
        Detection(class_id, label_name(names, class_id), round(score, 5), (b[0], b[1], b[2], b[3]))
        for class_id, score, b in zip(labels[index].tolist(), scores[index].tolist(),
                                      picked.round(2).tolist())
    ]


def original_boxes(boxes: npt.NDArray[np.float32], letterbox: Letterbox | None
                   ) -> npt.NDArray[np.float32]:
    """(k, 4) boxes in original pixels: a letterboxed model's mapped back, others as they are
    (the official graph scales them by the original size already)."""
    if letterbox is None:
        return boxes
    mapped = boxes.astype(np.float32, copy=True)
    mapped[:, 0::2] = (mapped[:, 0::2] - letterbox.pad_x) / letterbox.scale
    mapped[:, 1::2] = (mapped[:, 1::2] - letterbox.pad_y) / letterbox.scale
    return mapped


def _dedupe(labels: npt.NDArray[np.int64], boxes: npt.NDArray[np.float64], iou: float
            ) -> npt.NDArray[np.intp]:
    """Indices to keep of detections sorted by score: greedy, per class (NMS within a class).
    labels (n,), boxes (n, 4) xyxy."""
    n = len(boxes)
    if n < 2:
        return np.arange(n)
    x1, y1, x2, y2 = boxes.T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    inter_w = np.clip(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0, None)
    inter_h = np.clip(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0, None)
    inter = inter_w * inter_h
    overlap = inter / np.maximum(area[:, None] + area - inter, 1e-9)
    same = (overlap >= iou) & (labels[:, None] == labels)
    dropped = np.zeros(n, bool)
    for k in range(n):  # best first: a kept detection drops the weaker ones it covers
        if not dropped[k]:
            dropped[k + 1:] |= same[k, k + 1:]
    return np.flatnonzero(~dropped)
