"""Procedurally rendered shapes, written as a COCO-format detection dataset.

Layout written by ``write_dataset``::

    OUT/train/images/000000.jpg ...   OUT/train/annotations.json
    OUT/val/images/000000.jpg ...     OUT/val/annotations.json

Every image is rendered from its own seed (dataset seed, split, index), so a split is the same
whatever the number of worker processes, and the validation split never overlaps the train split.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle")
MIN_SIDE, MAX_SIDE = 240, 1280
MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION = 0.08, 0.50  # of the image's shorter side
MAX_OBJECTS = 12
MAX_HIDDEN_FRACTION = 0.40

Image = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Shape:
    class_id: int  # index into CLASSES
    bbox_xywh: tuple[float, float, float, float]  # pixels of the rendered image


def _smooth_field(rng: np.random.Generator, height: int, width: int) -> npt.NDArray[np.float32]:
    """A random field in [0, 1] with structure at a random scale (clouds, blobs)."""
    cells = int(rng.integers(2, 12))
    coarse = rng.random((cells, max(2, cells * width // height), 3), dtype=np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0.0, 1.0)


def _background(rng: np.random.Generator, height: int, width: int) -> Image:
    kind = rng.choice(["flat", "gradient", "noise", "field", "stripes", "blobs"])
    base = rng.integers(0, 256, 3).astype(np.float32)
    if kind == "flat":
        image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    elif kind == "gradient":
        other = rng.integers(0, 256, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        image = base + (other - base) * t[..., None]
    elif kind == "noise":
        sigma = rng.uniform(10, 60)
        image = base + rng.normal(0, sigma, (height, width, 3)).astype(np.float32)
    elif kind == "field":
        image = _smooth_field(rng, height, width) * 255.0
    elif kind == "stripes":
        other = rng.integers(0, 256, 3).astype(np.float32)
        period = rng.uniform(6, 60)
        angle = rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * t / period)
        image = base + (other - base) * wave[..., None]
    else:  # blobs: many soft ellipses, a texture that shapes must stand out from
        image = np.broadcast_to(base, (height, width, 3)).astype(np.float32).copy()
        for _ in range(int(rng.integers(5, 30))):
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (int(rng.integers(5, width // 4 + 6)), int(rng.integers(5, height // 4 + 6)))
            color = tuple(float(c) for c in rng.integers(0, 256, 3))
            cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(3, 12)))
    return np.ascontiguousarray(np.clip(image, 0, 255), dtype=np.uint8)


def _shape_polygon(
    rng: np.random.Generator, class_id: int, size: float, center: tuple[float, float]
) -> npt.NDArray[np.float32] | None:
    """Outline of one shape as an (n, 2) float polygon; None for a circle (drawn natively)."""
    cx, cy = center
    if CLASSES[class_id] == "circle":
        return None
    if CLASSES[class_id] == "rectangle":
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        # ``size`` is the longer side, so the shape's extent stays within the size range.
        w, h = (size, size / aspect) if aspect >= 1 else (size * aspect, size)
        box = cv2.boxPoints(((cx, cy), (w, h), float(rng.uniform(0, 180))))
        return np.asarray(box, dtype=np.float32)
    # Triangle: three points on a circle at random angles, rejected when nearly degenerate.
    for _ in range(50):
        angles = np.sort(rng.uniform(0, 2 * math.pi, 3))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * math.pi]))
        if gaps.min() > 0.5:  # every interior angle > ~14 degrees
            radius = size / 2
            points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
            return points.astype(np.float32)
    return None


def _fill_mask(
    height: int, width: int, polygon: npt.NDArray[np.float32] | None, center: tuple[float, float],
    size: float,
) -> Mask:
    mask = np.zeros((height, width), np.uint8)
    if polygon is None:
        cv2.circle(mask, (round(center[0]), round(center[1])), round(size / 2), 1, -1)
    else:
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return mask.astype(bool)


def _contrasts(image: Image, mask: Mask, color: npt.NDArray[np.float32]) -> bool:
    """A shape must differ visibly from what it is drawn on."""
    under = image[mask].astype(np.float32).mean(axis=0)
    return float(np.abs(under - color).sum()) > 90.0


def render(seed: int) -> tuple[Image, list[Shape]]:
    """Render one BGR image and its shapes. Boxes are the whole shape's extent (amodal)."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    while height == width:
        width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    image = _background(rng, height, width)
    short = min(height, width)
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    masks: list[Mask] = []  # visible part of each placed shape
    full_areas: list[int] = []
    shapes: list[Shape] = []
    for _ in range(wanted * 20):
        if len(shapes) == wanted:
            break
        class_id = int(rng.integers(0, len(CLASSES)))
        size = short * rng.uniform(MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION)
        half = size / 2
        center = (rng.uniform(half, width - half), rng.uniform(half, height - half))
        polygon = _shape_polygon(rng, class_id, size, center)
        if polygon is None and CLASSES[class_id] != "circle":
            continue
        mask = _fill_mask(height, width, polygon, center, size)
        area = int(mask.sum())
        if area < 16:
            continue
        # Reject a placement that would hide too much of an earlier shape.
        if any(
            (m & ~mask).sum() < (1 - MAX_HIDDEN_FRACTION) * a for m, a in zip(masks, full_areas)
        ):
            continue
        color = rng.integers(0, 256, 3).astype(np.float32)
        for _retry in range(10):
            if _contrasts(image, mask, color):
                break
            color = rng.integers(0, 256, 3).astype(np.float32)
        else:
            continue
        bgr = tuple(float(c) for c in color)
        if polygon is None:
            cv2.circle(image, (round(center[0]), round(center[1])), round(half), bgr, -1,
                       cv2.LINE_AA)
        else:
            cv2.fillPoly(image, [np.round(polygon * 16).astype(np.int32)], bgr, cv2.LINE_AA,
                         shift=4)
        masks = [m & ~mask for m in masks] + [mask]
        full_areas.append(area)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        shapes.append(Shape(class_id, (x0, y0, x1 - x0, y1 - y0)))
    return image, shapes


def image_seed(dataset_seed: int, split: str, index: int) -> int:
    return zlib.crc32(f"{dataset_seed}/{split}/{index}".encode())


def _render_to_file(job: tuple[int, Path]) -> tuple[int, int, list[Shape]]:
    seed, path = job
    image, shapes = render(seed)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return image.shape[1], image.shape[0], shapes


def write_split(out: Path, split: str, count: int, seed: int, workers: int) -> Path:
    """Render ``count`` images into ``out/split`` and write its COCO ``annotations.json``."""
    images_dir = out / split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(image_seed(seed, split, i), images_dir / f"{i:06d}.jpg") for i in range(count)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_render_to_file, jobs, chunksize=16))
    coco: dict[str, list[dict[str, object]]] = {
        "images": [],
        "annotations": [],
        # COCO ids start at 1; models see the contiguous index (id - 1).
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CLASSES)],
    }
    for image_id, ((width, height, shapes), (_, path)) in enumerate(zip(results, jobs), start=1):
        coco["images"].append(
            {"id": image_id, "file_name": f"images/{path.name}", "width": width, "height": height}
        )
        for shape in shapes:
            x, y, w, h = shape.bbox_xywh
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id,
                "category_id": shape.class_id + 1, "bbox": [x, y, w, h], "area": w * h,
                "iscrowd": 0,
            })
    annotations = out / split / "annotations.json"
    annotations.write_text(json.dumps(coco))
    return annotations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=4000, help="train images")
    parser.add_argument("--val", type=int, default=500, help="held-out validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    for split, count in (("train", args.train), ("val", args.val)):
        if count > 0:
            path = write_split(args.out, split, count, args.seed, args.workers)
            print(f"{split}: {count} images -> {path}")


if __name__ == "__main__":
    main()
