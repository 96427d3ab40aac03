"""dfine-serve quantize on a small graph: QDQ nodes around its convolution and matrix product,
int8 per-channel weights, its float tail kept, metadata recorded, and answers near the float
model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models.quantize import calibration_images, quantize


def small_detector(path: Path) -> Path:
    """images (N, 3, 64, 64) -> Conv 8 -> Relu -> GlobalAveragePool -> Flatten -> MatMul (8x4)
    -> Sigmoid -> scores (N, 4): a backbone, a head and a score tail in six nodes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4)).astype(np.float32), "m")]
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "m"], ["logits"], name="head"),
             helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid")]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                       ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "dfine.labels", '["a", "b", "c", "d"]'
    onnx.save(model, str(path))
    return path


def test_a_small_graph_is_quantized_with_its_tail_in_float(tmp_path: Path) -> None:
    source = small_detector(tmp_path / "small.onnx")
    out = tmp_path / "small_int8.onnx"
    record = quantize(source, out, calibration_images(None, 8, seed=3))
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert any(v == TensorProto.INT8 for v in weights.values())  # int8 weights
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer["scores"].op_type == "Sigmoid"  # the tail computes in float
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["dfine.quantization"])["format"] == "QDQ" == record["format"]
    assert meta["dfine.labels"] == '["a", "b", "c", "d"]'  # the source's metadata kept
    images = np.random.default_rng(1).random((2, 3, 64, 64), np.float32)
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(source), providers=cpu).run(None, {"images": images})[0]
    got = ort.InferenceSession(str(out), providers=cpu).run(None, {"images": images})[0]
    np.testing.assert_allclose(got, want, atol=0.05)
