"""Model layouts: the official D-FINE export and the raw head, told apart by tensor names."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

Layout = Literal["official", "raw_head"]

OFFICIAL_INPUTS = ("images", "orig_target_sizes")
OFFICIAL_OUTPUTS = ("labels", "boxes", "scores")
RAW_IMAGE_INPUTS = ("images", "pixel_values")
RAW_LOGITS_OUTPUTS = ("logits", "pred_logits")
RAW_BOXES_OUTPUT = "pred_boxes"


def raw_head_to_official(
    logits: npt.NDArray[np.float32],  # (n, q, c) class logits
    boxes_cxcywh: npt.NDArray[np.float32],  # (n, q, 4) cx, cy, w, h in [0, 1]
    sizes_wh: npt.NDArray[np.int64],  # (n, 2) width, height of each original image
    top_k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The official export's in-graph postprocessor, in numpy.

    Returns labels (n, k), boxes (n, k, 4) xyxy in original pixels and scores (n, k) sorted
    descending: sigmoid, then top-k over queries x classes, as D-FINE's PostProcessor does.
    """
    n, _, num_classes = logits.shape
    scores_all = 1.0 / (1.0 + np.exp(-logits.reshape(n, -1).astype(np.float32)))
    k = min(top_k, scores_all.shape[1])
    top = np.argpartition(-scores_all, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores_all, top, 1), axis=1, kind="stable")
    index = np.take_along_axis(top, order, 1)
    scores = np.take_along_axis(scores_all, index, 1)
    labels = (index % num_classes).astype(np.int64)
    query = index // num_classes
    cx, cy, w, h = np.moveaxis(np.take_along_axis(boxes_cxcywh, query[..., None], 1), -1, 0)
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    scale = np.concatenate([sizes_wh, sizes_wh], axis=1).astype(np.float32)[:, None, :]
    return labels, (xyxy * scale).astype(np.float32), scores.astype(np.float32)
