"""Procedurally rendered shapes, written as a COCO-format detection dataset.

Layout written by ``write_dataset``::

    OUT/train/images/000000.jpg ...   OUT/train/annotations.json
    OUT/val/images/000000.jpg ...     OUT/val/annotations.json

Every image is rendered from its own seed (dataset seed, split, index), so a split is the same
whatever the number of worker processes, and the validation split never overlaps the train split.

Two kinds of scene:

- the default (``render``): images of 240 to 1280 pixels a side, 1 to 12 shapes of 8 to 50 %
  of the short side: what the shipped model was trained and is scored on;
- ``--small`` (``render_small``): big scenes with many small shapes, for tiled inference
  (issue 28). The same classes, backgrounds, colours and amodal boxes, but fixed-size images
  (``--image-size``, default 2048x2048), 40 to 120 shapes each (``--objects MIN MAX``) of 12
  to 40 pixels (``--object-size MIN MAX``: a circle's diameter, a rectangle's longer side, a
  triangle's circumscribed diameter, as in the default scenes). Its images are seeded apart from
  the default ones (the split is named ``small/val`` in the seed), and written the same way::

    python -m models.synthetic --out data/small --small --val 50 --train 0
    python -m models.synthetic --out data/small16 --small --object-size 16 48 --val 50

``--train`` and ``--val`` default to 4000 and 500 images, or to 0 and 50 with ``--small``.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        # (asarray: a no-op on the float32 result, for the stubs' looser return type)
        image = np.asarray(cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(3, 12))),
                           np.float32)
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


def _contrasting_color(rng: np.random.Generator, image: Image, mask: Mask
                       ) -> tuple[float, ...] | None:
    """A colour that differs visibly from what it is drawn on, in 10 tries, or None."""
    color = rng.integers(0, 256, 3).astype(np.float32)
    for _retry in range(10):
        if _contrasts(image, mask, color):
            return tuple(float(c) for c in color)
        color = rng.integers(0, 256, 3).astype(np.float32)
    return None


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
        bgr = _contrasting_color(rng, image, mask)
        if bgr is None:
            continue
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


@dataclass(frozen=True)
class SmallScene:
    """The small-object scenes' parameters (``render_small``): image size, the shapes' size
    range in pixels (as ``render``'s: diameter, longer side, circumscribed diameter) and how
    many shapes an image asks for (fewer when placements keep failing)."""

    width: int = 2048
    height: int = 2048
    min_object: float = 12.0
    max_object: float = 40.0
    min_objects: int = 40
    max_objects: int = 120

    def __post_init__(self) -> None:
        if not 4 <= self.min_object <= self.max_object:
            raise ValueError(f"object size must be 4 <= MIN <= MAX pixels, got "
                             f"{self.min_object}..{self.max_object}")
        # A shape of the largest size, rotated anyhow, must fit inside the image.
        if min(self.width, self.height) < 2 * _reach(self.max_object) + 2:
            raise ValueError(f"a {self.width}x{self.height} image is too small for shapes of "
                             f"{self.max_object} pixels")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"objects must be 1 <= MIN <= MAX, got "
                             f"{self.min_objects}..{self.max_objects}")


def _reach(size: float) -> float:
    """How far a shape of ``size`` extends from its centre at most: a square's half diagonal."""
    return size * math.sqrt(2) / 2


@dataclass
class _Placed:
    """A placed shape's window (x0, y0: its top-left in the image) and its visible pixels."""

    x0: int
    y0: int
    visible: Mask  # the window's pixels still showing this shape
    area: int  # pixels of the whole shape
    shown: int  # pixels still visible


def render_small(seed: int, scene: SmallScene = SmallScene()) -> tuple[Image, list[Shape]]:
    """Render one BGR scene of many small shapes. As ``render`` (the same backgrounds, classes,
    colours, contrast and occlusion rules, amodal boxes), but each shape's masks cover only its
    own window: full-image masks per shape would cost 4 MB and a full pass each at 2048x2048.
    Shapes are placed wholly inside the image, so every box is the shape's full extent."""
    rng = np.random.default_rng(seed)
    height, width = scene.height, scene.width
    image = _background(rng, height, width)
    wanted = int(rng.integers(scene.min_objects, scene.max_objects + 1))
    placed: list[_Placed] = []
    windows = np.zeros((wanted, 4), np.int64)  # x0, y0, x1, y1 of each placed shape
    shapes: list[Shape] = []
    for _ in range(wanted * 20):
        if len(shapes) == wanted:
            break
        class_id = int(rng.integers(0, len(CLASSES)))
        size = float(rng.uniform(scene.min_object, scene.max_object))
        reach = _reach(size)
        center = (float(rng.uniform(reach, width - reach)),
                  float(rng.uniform(reach, height - reach)))
        polygon = _shape_polygon(rng, class_id, size, center)
        if polygon is None and CLASSES[class_id] != "circle":
            continue
        # The window: the shape's reach, plus a pixel for rounding, within the image.
        x0 = max(0, math.floor(center[0] - reach) - 1)
        y0 = max(0, math.floor(center[1] - reach) - 1)
        x1 = min(width, math.ceil(center[0] + reach) + 2)
        y1 = min(height, math.ceil(center[1] + reach) + 2)
        offset = np.asarray([x0, y0], np.float32)
        mask = _fill_mask(y1 - y0, x1 - x0, None if polygon is None else polygon - offset,
                          (center[0] - x0, center[1] - y0), size)
        area = int(mask.sum())
        if area < 16:
            continue
        n = len(placed)
        hits = np.flatnonzero((windows[:n, 0] < x1) & (windows[:n, 2] > x0)
                              & (windows[:n, 1] < y1) & (windows[:n, 3] > y0))
        overlaps = [(placed[i], _overlap(placed[i], x0, y0, mask)) for i in hits]
        # Reject a placement that would hide too much of an earlier shape.
        if any(p.shown - int(covered.sum()) < (1 - MAX_HIDDEN_FRACTION) * p.area
               for p, (_, covered) in overlaps):
            continue
        window = image[y0:y1, x0:x1]
        bgr = _contrasting_color(rng, window, mask)
        if bgr is None:
            continue
        if polygon is None:
            cv2.circle(image, (round(center[0]), round(center[1])), round(size / 2), bgr, -1,
                       cv2.LINE_AA)
        else:
            cv2.fillPoly(image, [np.round(polygon * 16).astype(np.int32)], bgr, cv2.LINE_AA,
                         shift=4)
        for p, (region, covered) in overlaps:
            p.visible[region] &= ~covered
            p.shown -= int(covered.sum())
        placed.append(_Placed(x0, y0, mask, area, area))
        windows[n] = (x0, y0, x1, y1)
        ys, xs = np.nonzero(mask)
        bx0, by0 = float(xs.min() + x0), float(ys.min() + y0)
        bx1, by1 = float(xs.max() + 1 + x0), float(ys.max() + 1 + y0)
        shapes.append(Shape(class_id, (bx0, by0, bx1 - bx0, by1 - by0)))
    return image, shapes


def _overlap(p: _Placed, x0: int, y0: int, mask: Mask
             ) -> tuple[tuple[slice, slice], Mask]:
    """Where a new shape (``mask`` at x0, y0) meets placed ``p``: the region, in ``p``'s window,
    and which of ``p``'s visible pixels there the new shape covers."""
    ph, pw = p.visible.shape
    h, w = mask.shape
    left, top = max(p.x0, x0), max(p.y0, y0)
    right, bottom = min(p.x0 + pw, x0 + w), min(p.y0 + ph, y0 + h)
    region = (slice(top - p.y0, bottom - p.y0), slice(left - p.x0, right - p.x0))
    covered = p.visible[region] & mask[top - y0:bottom - y0, left - x0:right - x0]
    return region, covered


def image_seed(dataset_seed: int, split: str, index: int) -> int:
    return zlib.crc32(f"{dataset_seed}/{split}/{index}".encode())


def _render_to_file(job: tuple[int, Path, SmallScene | None]) -> tuple[int, int, list[Shape]]:
    seed, path, scene = job
    image, shapes = render(seed) if scene is None else render_small(seed, scene)
    cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return image.shape[1], image.shape[0], shapes


def write_split(out: Path, split: str, count: int, seed: int, workers: int,
                small: SmallScene | None = None) -> Path:
    """Render ``count`` images into ``out/split`` and write its COCO ``annotations.json``:
    ``render``'s scenes, or ``render_small``'s with ``small`` (seeded apart: "small/<split>")."""
    images_dir = out / split / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    seed_split = split if small is None else f"small/{split}"
    jobs = [(image_seed(seed, seed_split, i), images_dir / f"{i:06d}.jpg", small)
            for i in range(count)]
    chunk = 16 if small is None else 1  # big scenes: spread them evenly over the workers
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_render_to_file, jobs, chunksize=chunk))
    coco: dict[str, list[dict[str, object]]] = {
        "images": [],
        "annotations": [],
        # COCO ids start at 1; models see the contiguous index (id - 1).
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CLASSES)],
    }
    for image_id, ((width, height, shapes), (_, path, _)) in enumerate(zip(results, jobs),
                                                                      start=1):
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


def _image_size(text: str) -> tuple[int, int]:
    """``--image-size``: "2048" (square) or "WIDTHxHEIGHT"."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and 0 < int(p) <= 65536 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise argparse.ArgumentTypeError(f"expected SIZE or WIDTHxHEIGHT, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, help="train images (4000; with --small 0)")
    parser.add_argument("--val", type=int, help="held-out validation images (500; --small 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    small = parser.add_argument_group("small objects (--small)")
    small.add_argument("--small", action="store_true",
                       help="big scenes with many small shapes (render_small)")
    small.add_argument("--image-size", type=_image_size, default=(2048, 2048),
                       metavar="SIZE|WxH", help="image size (2048)")
    small.add_argument("--object-size", type=float, nargs=2, default=(12.0, 40.0),
                       metavar=("MIN", "MAX"), help="shape size range in pixels (12 40)")
    small.add_argument("--objects", type=int, nargs=2, default=(40, 120),
                       metavar=("MIN", "MAX"), help="shapes per image (40 120)")
    args = parser.parse_args(argv)
    scene: SmallScene | None = None
    if args.small:
        try:
            scene = SmallScene(*args.image_size, *args.object_size, *args.objects)
        except ValueError as exc:
            parser.error(str(exc))
    defaults: dict[str, Any] = {"train": 4000, "val": 500} if scene is None else {
        "train": 0, "val": 50}
    for split in ("train", "val"):
        count = defaults[split] if getattr(args, split) is None else getattr(args, split)
        if count > 0:
            path = write_split(args.out, split, count, args.seed, args.workers, scene)
            print(f"{split}: {count} images -> {path}")


if __name__ == "__main__":
    main()
