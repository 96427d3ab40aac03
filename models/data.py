"""COCO-format datasets, read and resized as the service resizes (``app.imaging``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from app.imaging import stretch_resize


@dataclass
class CocoImage:
    image_id: int
    path: Path
    width: int
    height: int
    class_ids: list[int] = field(default_factory=list)  # contiguous 0..C-1
    boxes_xywh: list[list[float]] = field(default_factory=list)  # pixels


@dataclass
class CocoDataset:
    annotations_path: Path
    labels: list[str]  # contiguous class index -> name
    category_ids: list[int]  # contiguous class index -> COCO category id
    images: list[CocoImage]


def find_annotations(root: Path) -> Path:
    """``root`` may be the annotations file itself or a split folder holding annotations.json."""
    return root if root.is_file() else root / "annotations.json"


def load_coco(root: Path) -> CocoDataset:
    """Read a COCO detection file; image paths resolve against the file's folder."""
    annotations_path = find_annotations(root)
    coco: dict[str, Any] = json.loads(annotations_path.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    images = {
        im["id"]: CocoImage(im["id"], annotations_path.parent / im["file_name"], im["width"],
                            im["height"])
        for im in coco["images"]
    }
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        image = images[ann["image_id"]]
        image.class_ids.append(index_of[ann["category_id"]])
        image.boxes_xywh.append([float(v) for v in ann["bbox"]])
    return CocoDataset(
        annotations_path, [c["name"] for c in categories], [c["id"] for c in categories],
        list(images.values()),
    )


def read_resized(path: Path, size: int) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode {path}")
    return cv2.cvtColor(stretch_resize(image, size, size), cv2.COLOR_BGR2RGB)


def load_resized(images: list[CocoImage], size: int, workers: int = 8
                 ) -> npt.NDArray[np.uint8]:
    """All images decoded and stretched, as one (n, size, size, 3) RGB array."""
    out = np.empty((len(images), size, size, 3), np.uint8)

    def fill(i: int) -> None:
        out[i] = read_resized(images[i].path, size)

    with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 releases the GIL
        list(pool.map(fill, range(len(images))))
    return out


def normalized_cxcywh(image: CocoImage) -> npt.NDArray[np.float32]:
    """Boxes as (n, 4) cx, cy, w, h in [0, 1], which stretching leaves unchanged."""
    boxes = np.asarray(image.boxes_xywh, np.float32).reshape(-1, 4)
    scale = np.asarray([image.width, image.height] * 2, np.float32)
    boxes[:, :2] += boxes[:, 2:] / 2
    return boxes / scale
