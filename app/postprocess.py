"""Per-image postprocessing of the official layout: threshold, class filter, clip, name."""

from __future__ import annotations

from dataclasses import dataclass

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
) -> list[Detection]:
    """Detections sorted by score, descending, boxes clipped to the original image.

    The same box may come twice with two labels: top-k runs over queries x classes. That is the
    model's output, not a duplicate to suppress.
    """
    keep = scores >= score_threshold
    if class_ids is not None:
        keep &= np.isin(labels, np.fromiter(class_ids, np.int64, len(class_ids)))
    index = np.flatnonzero(keep)
    index = index[np.argsort(-scores[index], kind="stable")][:max_detections]
    picked = boxes[index].astype(np.float64)
    if letterbox is not None:
        picked[:, 0::2] = (picked[:, 0::2] - letterbox.pad_x) / letterbox.scale
        picked[:, 1::2] = (picked[:, 1::2] - letterbox.pad_y) / letterbox.scale
    picked[:, 0::2] = picked[:, 0::2].clip(0, width)
    picked[:, 1::2] = picked[:, 1::2].clip(0, height)
    return [
        Detection(int(labels[i]), label_name(names, int(labels[i])), float(scores[i]),
                  (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        for i, b in zip(index, picked)
    ]
