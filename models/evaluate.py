"""COCO AP of an exported ONNX model, run by onnxruntime, on a COCO-format folder.

The preprocessing is the evaluator's own, the official pipeline's: stretch resize (no letterbox),
RGB, /255, NCHW float32, sizes passed as (width, height).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tqdm import tqdm

from app.bench.evaluate import coco_metrics
from models.data import CocoImage, load_coco, read_resized


@dataclass
class OnnxDetector:
    """The official layout run by onnxruntime; batch size follows the model's batch axis."""

    session: ort.InferenceSession
    width: int
    height: int

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> OnnxDetector:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        if names != {"images", "orig_target_sizes"}:
            raise ValueError(f"{path}: inputs {sorted(names)} are not the official layout")
        _, _, height, width = session.get_inputs()[0].shape
        return cls(session, int(width), int(height))

    def __call__(self, pixels: npt.NDArray[np.float32], sizes_wh: npt.NDArray[np.int64]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels, boxes, scores = self.session.run(
            ["labels", "boxes", "scores"], {"images": pixels, "orig_target_sizes": sizes_wh})
        return labels, boxes, scores


def detections_for(images: list[CocoImage], detector: OnnxDetector, category_ids: list[int],
                   batch_size: int) -> list[dict[str, Any]]:
    """COCO result entries (all top-k detections, as AP wants them)."""
    results: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(images), batch_size), unit="batch", leave=False):
        chunk = images[start:start + batch_size]
        pixels = np.stack([read_resized(im.path, detector.width) for im in chunk])
        pixels = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        sizes = np.asarray([[im.width, im.height] for im in chunk], np.int64)
        labels, boxes, scores = detector(pixels, sizes)
        for im, lab, box, score in zip(chunk, labels, boxes, scores):
            box = box.copy()
            box[:, 0::2] = box[:, 0::2].clip(0, im.width)
            box[:, 1::2] = box[:, 1::2].clip(0, im.height)
            for c, (x1, y1, x2, y2), s in zip(lab, box, score):
                results.append({"image_id": im.image_id, "category_id": category_ids[int(c)],
                                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                "score": float(s)})
    return results


def evaluate(model: Path, data: Path, batch_size: int = 8, threads: int = 0,
             limit: int = 0) -> dict[str, Any]:
    dataset = load_coco(data)
    images = dataset.images[:limit] if limit else dataset.images
    detector = OnnxDetector.load(model, threads)
    started = time.perf_counter()
    results = detections_for(images, detector, dataset.category_ids, batch_size)
    elapsed = time.perf_counter() - started
    metrics = coco_metrics(dataset.annotations_path, results,
                           [im.image_id for im in images] if limit else None)
    return {**metrics, "images": len(images), "images_per_s": round(len(images) / elapsed, 2),
            "model": str(model), "data": str(dataset.annotations_path)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="COCO AP of an ONNX export, run by onnxruntime.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="split folder or annotations file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    args = p.parse_args(argv)
    result = evaluate(args.model, args.data, args.batch_size, args.threads, args.limit)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
