"""FP16 at load: the model's float32 weights and compute converted to float16 for the CUDA
provider, its inputs and outputs kept float32 and the parts that lose accuracy kept float32.

Kept in float32: LayerNormalization (its variance overflows fp16 easily), GridSample (the CUDA
provider has no fp16 kernel for it: it would fall back to the CPU), onnxruntime's default
block list (TopK among others), and the tail: every node between the last matrix products and
the graph's outputs (the sigmoid and top-k over queries x classes, the box decoding and the
scaling to pixels). The tail is cheap elementwise work, and a score that rounds to fp16 can
change the order of close detections. TensorRT has its own fp16 path (TRT_FP16).

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import ModelLoadError

# The tail walk stops at these: they are the model's heavy compute, worth running in fp16.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})
# These read only their input's shape, not its values: the walk does not follow their inputs.
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape"})
# LayerNormalization: its variance overflows fp16. GridSample: the CUDA provider registers it
# for float only, so an fp16 one runs on the CPU, with copies that also rule out CUDA graphs.
KEEP_FP32_OPS = ("LayerNormalization", "GridSample")


def tail_nodes(graph: Any) -> list[str]:
    """Names of the nodes that lead to the graph's outputs without passing a compute op.

    Walks back from the outputs through each node's producers and stops at (and leaves out)
    Conv/MatMul/Gemm/Einsum nodes, and does not follow what Shape reads. Nodes without a name
    are named here so they can be listed.
    """
    producer: dict[str, Any] = {}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"dfine_unnamed_{index}"
        for output in node.output:
            producer[output] = node
    kept: dict[str, Any] = {}
    pending = [o.name for o in graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in kept or node.op_type in COMPUTE_OPS:
            continue
        kept[node.name] = node
        if node.op_type not in SHAPE_OPS:
            pending.extend(node.input)
    return list(kept)


def to_fp16(path: Path) -> bytes:
    """The model at ``path`` with float16 weights and compute, serialised for onnxruntime."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )
    except ImportError as exc:
        raise ModelLoadError("precision fp16 needs the onnx package (pip install onnx)"
                             ) from exc
    model = onnx.load(str(path))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *KEEP_FP32_OPS],
            node_block_list=tail_nodes(model.graph))
    except Exception as exc:  # the converter raises plain exceptions of several types
        raise ModelLoadError(f"cannot convert {path} to fp16: {exc}") from exc
    data: bytes = converted.SerializeToString()
    return data
