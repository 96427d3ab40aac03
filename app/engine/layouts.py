"""Model layouts: the official D-FINE export and the raw head, told apart by tensor names."""

from __future__ import annotations

from pathlib import Path
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


def official_class_count(path: Path) -> int | None:
    """The class count of an official export, read from its graph: the official postprocessor
    computes ``labels = index - index // C * C`` (or ``index % C``) with C a constant. None
    where C is computed from a shape (other exporters) or the onnx package is not installed.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}

    def constant(name: str) -> int | None:
        node = producer.get(name)
        if node is not None and node.op_type == "Cast":
            return constant(node.input[0])
        if node is not None and node.op_type == "Constant" and node.attribute:
            value = numpy_helper.to_array(node.attribute[0].t)
        elif name in initializers:
            value = numpy_helper.to_array(initializers[name])
        else:
            return None
        return int(value.reshape(-1)[0]) if value.size == 1 else None

    node = producer.get("labels")
    for _ in range(4):  # labels <- (Cast, Reshape...) <- Mod or Sub
        if node is None or not node.input:
            return None
        if node.op_type == "Mod":
            return constant(node.input[1])
        if node.op_type == "Sub":  # index - (index // C) * C
            product = producer.get(node.input[1])
            if product is None or product.op_type != "Mul":
                return None
            found = [c for c in (constant(i) for i in product.input) if c is not None]
            return found[0] if len(found) == 1 else None
        node = producer.get(node.input[0])
    return None
