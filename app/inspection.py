"""``dfine-serve inspect``: what the engine hands onnxruntime for one bucket, and what
onnxruntime makes of it, so that a user can see why a CUDA graph would not be captured.

    dfine-serve inspect --model-path m.onnx --precision fp16 --bucket 8 \\
        --save b8.onnx --save-optimized b8-opt.onnx

The model as handed over: converted to fp16 if asked, the batch axis fixed to the bucket (the
engine sets it through a session option; the saved copy has it written into the graph).
Optimized: onnxruntime's basic graph optimizations on the CPU, as every provider gets them;
Shape nodes left there would run on the CPU beside a GPU and rule out CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from app.config import DEFAULT_MODEL_PATH
from app.engine.model import inspect_model
from app.engine.precision import to_fp16
from app.engine.sessions import SessionConfig, session_options

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
# Ops that compute shapes: left in a graph, they run on the CPU next to a GPU.
SHAPE_ARITHMETIC = ("Shape", "Range", "ScatterND", "ConstantOfShape", "NonZero")


def bucket_model(path: Path, precision: str, bucket: int | None) -> onnx.ModelProto:
    """The model as the engine hands it to onnxruntime for ``bucket``, the batch axis written
    into the graph's inputs and outputs."""
    model = (onnx.load_from_string(to_fp16(path)) if precision == "fp16"
             else onnx.load(str(path)))
    batch_dim = inspect_model(path).batch_dim
    if bucket is not None and batch_dim:
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == batch_dim:
                    dim.dim_value = bucket
    return model


def optimized_model(model: onnx.ModelProto, save_to: Path) -> onnx.ModelProto:
    """What onnxruntime's basic optimizations (constant folding, shape folding) on the CPU make
    of ``model``."""
    options = session_options(SessionConfig([("CPUExecutionProvider", {})]),
                              ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.optimized_model_filepath = str(save_to)
    ort.InferenceSession(model.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    return onnx.load(str(save_to))


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def describe(model: onnx.ModelProto) -> dict[str, Any]:
    """Inputs and outputs, op counts, symbolic dimensions left anywhere in the graph, and the
    ops that compute in fp16 and in fp32 (by their first input's type)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    for node in graph.node:  # Constant nodes' outputs carry their tensor's type
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = node.attribute[0].t.data_type
    by_precision: dict[str, Counter[str]] = {"fp16": Counter(), "fp32": Counter()}
    for node in graph.node:
        first = types.get(node.input[0]) if node.input and node.input[0] else None
        if first in FLOAT_TYPES and node.op_type not in ("Cast", "Shape", "Size"):
            by_precision[FLOAT_TYPES[first]][node.op_type] += 1
    dynamic = sorted({d.dim_param for v in [*graph.input, *graph.output]
                      for d in v.type.tensor_type.shape.dim if d.dim_param})
    # Inside the graph: values whose shape inference could not settle every dimension.
    unsettled = sum(1 for v in graph.value_info
                    if any(not d.dim_value for d in v.type.tensor_type.shape.dim))
    ops = Counter(node.op_type for node in graph.node)
    return {
        "inputs": [{"name": v.name, "shape": _shape(v)} for v in graph.input],
        "outputs": [{"name": v.name, "shape": _shape(v)} for v in graph.output],
        "nodes": len(graph.node),
        "ops": dict(ops.most_common()),
        "shape_arithmetic": {op: ops[op] for op in SHAPE_ARITHMETIC if ops[op]},
        "dynamic_dims": dynamic,
        "values_with_dynamic_dims": unsettled,
        "fp16_ops": dict(by_precision["fp16"].most_common()),
        "fp32_ops": dict(by_precision["fp32"].most_common()),
    }


def report(path: Path, precision: str, bucket: int | None, save: Path | None = None,
           save_optimized: Path | None = None) -> dict[str, Any]:
    model = bucket_model(path, precision, bucket)
    if save:
        onnx.save(model, str(save))
    with tempfile.TemporaryDirectory() as scratch:
        optimized = optimized_model(model, save_optimized or Path(scratch) / "optimized.onnx")
        return {"model": str(path), "precision": precision, "bucket": bucket,
                "as_handed": describe(model), "optimized": describe(optimized)}


def _print(result: dict[str, Any]) -> None:
    print(f"{result['model']}: precision {result['precision']}, batch "
          f"{result['bucket'] or 'dynamic'}")
    for stage, title in (("as_handed", "as handed to onnxruntime"),
                         ("optimized", "after onnxruntime's basic optimizations (CPU)")):
        part = result[stage]
        print(f"\n{title}: {part['nodes']} nodes")
        for kind in ("inputs", "outputs"):
            print(f"  {kind}: " + ", ".join(f"{v['name']} {v['shape']}" for v in part[kind]))
        print(f"  dims still dynamic: {', '.join(part['dynamic_dims']) or 'none'} (inputs and "
              f"outputs); {part['values_with_dynamic_dims']} values inside")
        left = ", ".join(f"{op} {n}" for op, n in part["shape_arithmetic"].items())
        print(f"  shape arithmetic left: {left or 'none'}")
        print("  ops: " + ", ".join(f"{op} {n}" for op, n in part["ops"].items()))
        if stage == "optimized":  # the CPU provider wraps fp16 nodes in casts to fp32 here
            continue
        print("  fp16 ops: " + (", ".join(f"{op} {n}" for op, n in part["fp16_ops"].items())
                                or "none"))
        print("  fp32 ops: " + (", ".join(f"{op} {n}" for op, n in part["fp32_ops"].items())
                                or "none"))
    if result["optimized"]["shape_arithmetic"]:
        print("\nshape arithmetic is left: with a GPU provider those nodes run on the CPU with "
              "copies between, and the CUDA provider will not capture a graph")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dfine-serve inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--bucket", type=int, help="the batch size of the bucket (default: dynamic)")
    p.add_argument("--save", type=Path, help="write the model as handed to onnxruntime")
    p.add_argument("--save-optimized", type=Path,
                   help="write what onnxruntime's basic optimizations make of it")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.bucket is not None and args.bucket < 1:
        p.error("--bucket must be at least 1")
    result = report(args.model_path, args.precision, args.bucket, args.save,
                    args.save_optimized)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
