"""Tiny ONNX models built with onnx.helper, run by the real onnxruntime.

They answer fixed detections (so results are exactly predictable) in each layout the engine
accepts, and one fails at run time for wide images, to produce a real engine failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = 64
# Two detections, boxes normalised xyxy (the official graph scales them by the sizes).
BOXES = np.asarray([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]], np.float32)
SCORES = np.asarray([[0.9, 0.3]], np.float32)
LABELS = np.asarray([[1, 0]], np.int64)
FAIL_WIDTH = 2000  # images this wide make the faulty model's Gather index out of range


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _save(graph: onnx.GraphProto, path: Path, metadata: dict[str, str] | None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def official(path: Path, batch: int | str = "N", labels: list[str] | None = None,
             faulty: bool = False, input_size: int = INPUT,
             metadata: dict[str, str] | None = None, num_classes: int | None = None,
             scores: np.ndarray = SCORES) -> Path:
    """Official layout: images, orig_target_sizes -> labels, boxes, scores (K = 2).

    ``scores``: what it answers for every image (NaN ones make a model that loads but
    answers nonsense).
    ``num_classes``: labels computed as the official postprocessor does,
    ``index - index // C * C`` with C a constant, so the graph tells its class count."""
    nodes = [
        _const("axes", np.asarray([1, 2, 3], np.int64)),
        helper.make_node("ReduceMean", ["images", "axes"], ["mean"], keepdims=0),  # (N,)
        _const("zero", np.asarray(0.0, np.float32)),
        helper.make_node("Mul", ["mean", "zero"], ["zeros"]),
        _const("one_axis", np.asarray([1], np.int64)),
        helper.make_node("Unsqueeze", ["zeros", "one_axis"], ["zeros_n1"]),  # (N, 1)
        _const("scores_c", np.asarray(scores, np.float32)),
        helper.make_node("Add", ["zeros_n1", "scores_c"], ["scores"]),
        _const("labels_c", LABELS),
        helper.make_node("Cast", ["zeros_n1"], ["zeros_i"], to=TensorProto.INT64),
        helper.make_node("Add", ["zeros_i", "labels_c"],
                         ["labels" if num_classes is None else "index"]),
        helper.make_node("Concat", ["orig_target_sizes", "orig_target_sizes"], ["wh2"], axis=1),
        helper.make_node("Cast", ["wh2"], ["wh2f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["wh2f", "one_axis"], ["scale"]),  # (N, 1, 4)
        _const("boxes_c", BOXES),
        helper.make_node("Mul", ["boxes_c", "scale"], ["boxes_raw"]),
    ]
    if num_classes is not None:
        nodes += [
            _const("classes", np.asarray(num_classes, np.int64)),
            helper.make_node("Div", ["index", "classes"], ["query"]),
            helper.make_node("Mul", ["query", "classes"], ["rounded"]),
            helper.make_node("Sub", ["index", "rounded"], ["labels"]),
        ]
    if faulty:
        # index = width // 1000: 0 or 1 is fine, 2 is out of bounds for a 2-element table.
        nodes += [
            _const("start", np.asarray([0, 0], np.int64)),
            _const("end", np.asarray([1, 1], np.int64)),
            helper.make_node("Slice", ["orig_target_sizes", "start", "end"], ["w"]),
            _const("thousand", np.asarray(1000, np.int64)),
            helper.make_node("Div", ["w", "thousand"], ["index"]),
            _const("table", np.asarray([0.0, 0.0], np.float32)),
            helper.make_node("Gather", ["table", "index"], ["picked"]),  # (N, 1)
            helper.make_node("Unsqueeze", ["picked", "one_axis"], ["picked3"]),
            helper.make_node("Add", ["boxes_raw", "picked3"], ["boxes"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["boxes_raw"], ["boxes"]))
    graph = helper.make_graph(
        nodes, "official",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                       [batch, 3, input_size, input_size]),
         helper.make_tensor_value_info("orig_target_sizes", TensorProto.INT64, [batch, 2])],
        [helper.make_tensor_value_info("labels", TensorProto.INT64, [batch, 2]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, 2, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 2])])
    meta = dict(metadata or {})
    if labels is not None:
        meta["dfine.labels"] = json.dumps(labels)
    return _save(graph, path, meta)


def raw_head(path: Path, input_name: str = "pixel_values", logits_name: str = "logits",
             num_classes: int = 2) -> Path:
    """Raw head: pixel_values -> logits (N, 3, C), pred_boxes (N, 3, 4) cxcywh normalised."""
    logits = np.full((1, 3, num_classes), -8.0, np.float32)
    logits[0, 0, 1] = 2.0  # query 0 is class 1 at sigmoid(2) = 0.881
    logits[0, 2, 0] = 0.0  # query 2 is class 0 at 0.5
    boxes = np.asarray([[[0.3, 0.4, 0.4, 0.4], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]]],
                       np.float32)
    nodes = [
        _const("axes", np.asarray([1, 2, 3], np.int64)),
        helper.make_node("ReduceMean", [input_name, "axes"], ["mean"], keepdims=1),  # (N,1,1,1)
        _const("zero", np.asarray(0.0, np.float32)),
        helper.make_node("Mul", ["mean", "zero"], ["zeros4"]),
        _const("sq", np.asarray([3], np.int64)),
        helper.make_node("Squeeze", ["zeros4", "sq"], ["zeros3"]),  # (N, 1, 1)
        _const("logits_c", logits),
        helper.make_node("Add", ["zeros3", "logits_c"], [logits_name]),
        _const("boxes_c", boxes),
        helper.make_node("Add", ["zeros3", "boxes_c"], ["pred_boxes"]),
    ]
    graph = helper.make_graph(
        nodes, "raw_head",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, INPUT, INPUT])],
        [helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["N", 3, num_classes]),
         helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, ["N", 3, 4])])
    return _save(graph, path, None)


def unknown_layout(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "unknown",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return _save(graph, path, None)
