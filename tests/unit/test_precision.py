"""FP16 conversion at load: structure of a small graph, and answers close to fp32 on the CPU
(onnxruntime runs fp16 nodes there, through casts where it has no fp16 kernel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.config import Settings
from app.engine.engine import OnnxEngine
from app.engine.precision import tail_nodes, to_fp16
from app.postprocess import select
from tests.helpers import DEFAULT_MODEL, box_iou
from tests.unit.test_buckets import scenes

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def small_head(path: Path) -> Path:
    """x (N, 8) -> MatMul, Add, LayerNorm, MatMul -> logits (N, 6) -> Sigmoid -> TopK 3:
    the shape of a detector's head and its score tail, in seven nodes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b1"),
             numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=(16, 6)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.asarray([3], np.int64), "k")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
             helper.make_node("LayerNormalization", ["hb", "gamma"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["logits"], name="mm2"),
             helper.make_node("Sigmoid", ["logits"], ["probs"], name="sigmoid"),
             helper.make_node("TopK", ["probs", "k"], ["scores", "labels"], name="topk")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("scores", FLOAT, ["N", 3]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def input_types(model: onnx.ModelProto) -> dict[str, int]:
    """Each named node's first input's element type, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return {node.name: types.get(node.input[0], 0) for node in inferred.graph.node if node.name}


def test_tail_is_the_work_after_the_last_matrix_product(tmp_path: Path) -> None:
    model = onnx.load(str(small_head(tmp_path / "head.onnx")))
    assert set(tail_nodes(model.graph)) == {"sigmoid", "topk"}


def test_fp16_keeps_io_layernorm_and_tail_in_fp32_and_answers_alike(tmp_path: Path) -> None:
    path = small_head(tmp_path / "head.onnx")
    converted = onnx.load_from_string(to_fp16(path))
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [FLOAT]
    assert [o.type.tensor_type.elem_type for o in converted.graph.output] == [
        FLOAT, TensorProto.INT64]
    weights = {i.name: i.data_type for i in converted.graph.initializer}
    assert weights["w1"] == HALF and weights["w2"] == HALF
    types = input_types(converted)
    assert types["mm1"] == HALF and types["mm2"] == HALF
    assert types["ln"] == FLOAT and types["sigmoid"] == FLOAT and types["topk"] == FLOAT
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    cpu = ["CPUExecutionProvider"]
    scores32, labels32 = ort.InferenceSession(str(path), providers=cpu).run(None, {"x": x})
    scores16, labels16 = ort.InferenceSession(converted.SerializeToString(),
                                              providers=cpu).run(None, {"x": x})
    assert scores16.dtype == np.float32
    np.testing.assert_allclose(scores16, scores32, atol=1e-2)
    np.testing.assert_array_equal(labels16[:, 0], labels32[:, 0])


def test_the_shipped_model_in_fp16_finds_what_fp32_finds() -> None:
    engines = {p: OnnxEngine.load(Settings(model_path=DEFAULT_MODEL, providers="cpu",
                                           precision=p)) for p in ("fp32", "fp16")}
    assert engines["fp16"].report()["precision"] == "fp16"
    images, sizes = scenes(3)
    found = {}
    for precision, engine in engines.items():
        out = engine.run(images, sizes)
        found[precision] = [select(out.labels[k], out.boxes[k], out.scores[k], *sizes[k],
                                   None, 0.5, 100) for k in range(3)]
    assert sum(len(full) for full in found["fp32"]) >= 3
    for half, full in zip(found["fp16"], found["fp32"]):
        for want in full:  # each fp32 detection (clear of the threshold) found in fp16 too
            if want.score < 0.55:
                continue
            match = max(half, key=lambda d: box_iou(d.box, want.box))
            assert match.class_id == want.class_id and box_iou(match.box, want.box) > 0.95
            assert match.score == pytest.approx(want.score, abs=0.02)
