"""``dfine-serve quantize``: static INT8 quantization (QDQ, per-channel weights) of a D-FINE
export with onnxruntime's tools, calibrated on the user's images or, for the shipped model,
on rendered shapes; the parts that lose accuracy in INT8 stay float.

    dfine-serve quantize --model models/dfine_n_shapes.onnx --out models/dfine_n_shapes_int8.onnx
    dfine-serve quantize --model my.onnx --calibration my_images/ --out my_int8.onnx

The output keeps the model's signature and records in its metadata how it was made
(``dfine.quantization``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from app.engine.precision import tail_nodes
from app.exact import open_rgb, prepare_exact

# Kept float: the ops whose INT8 error costs accuracy or that quantization cannot speed up.
FLOAT_OPS = ("LayerNormalization", "Softmax", "GridSample", "Sigmoid", "TopK", "GatherElements",
             "Einsum")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class Calibration(CalibrationDataReader):
    """Model-ready batches of one image, preprocessed as the service's exact mode does."""

    def __init__(self, images: list[bytes], model: Path) -> None:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in session.get_inputs()}
        image_input = inputs.get("images") or next(iter(inputs.values()))
        height, width = image_input.shape[2], image_input.shape[3]
        self._feeds: Iterator[dict[str, np.ndarray]] = iter([
            self._feed(data, image_input.name, "orig_target_sizes" in inputs, width, height)
            for data in images])

    @staticmethod
    def _feed(data: bytes, name: str, with_sizes: bool, width: int, height: int
              ) -> dict[str, np.ndarray]:
        prepared = prepare_exact(open_rgb(data, 50_000_000), width, height)
        feed = {name: prepared.pixels[None]}
        if with_sizes:
            feed["orig_target_sizes"] = np.asarray([prepared.target_size_wh], np.int64)
        return feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_images(folder: Path | None, count: int, seed: int) -> list[bytes]:
    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (
            ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"))
        if not files:
            raise SystemExit(f"no images in {folder}")
        return [p.read_bytes() for p in files[:count]]
    import cv2

    from models.synthetic import image_seed, render

    images = []
    for index in range(count):
        picture, _ = render(image_seed(seed, "calibration", index))  # BGR, as written to disk
        images.append(cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
    return images


def quantize(model: Path, out: Path, images: list[bytes], keep_float: tuple[str, ...] = FLOAT_OPS,
             tail_float: bool = True) -> dict[str, object]:
    """Quantize ``model`` into ``out``; returns what is recorded in its metadata."""
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        excluded = [n.name for n in graph.graph.node if n.op_type in keep_float]
        # A product that consumes a Softmax (attention weights times values) is left float:
        # quantized, onnxruntime fuses the Softmax between them into QLinearSoftmax, which
        # measured 5x slower than the float Softmax here (6.2 against 1.2 ms a run).
        producer = {out: node for node in graph.graph.node for out in node.output}
        excluded += [n.name for n in graph.graph.node if n.op_type in QUANTIZED_OPS and any(
            producer.get(i) is not None and producer[i].op_type == "Softmax" for i in n.input)]
        if tail_float:
            excluded += tail_nodes(graph.graph)
        onnx.save(graph, str(prepared))  # tail_nodes named any unnamed nodes
        quantize_static(
            str(prepared), str(out), Calibration(images, model),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=sorted(set(excluded)),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    record: dict[str, object] = {
        "format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
        "calibration_images": len(images), "quantized_ops": list(QUANTIZED_OPS),
        "float_ops": list(keep_float), "float_tail": tail_float}
    quantized = onnx.load(str(out))
    source = onnx.load(str(model), load_external_data=False)
    kept = {p.key: p.value for p in source.metadata_props}
    kept["dfine.quantization"] = json.dumps(record)
    del quantized.metadata_props[:]
    for key, value in kept.items():
        entry = quantized.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(quantized, str(out))
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="dfine-serve quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calibration", type=Path, help="a folder of images (default: rendered "
                   "shapes, as the shipped model was trained on)")
    p.add_argument("--count", type=int, default=64, help="calibration images")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    record = quantize(args.model, args.out, calibration_images(args.calibration, args.count,
                                                               args.seed))
    print(f"wrote {args.out}: {json.dumps(record)}")


if __name__ == "__main__":
    main()
