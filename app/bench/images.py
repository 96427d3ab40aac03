"""The bodies the bench sends: files from a folder, or synthetic JPEGs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def synthetic_jpegs(count: int, width: int = 640, height: int = 480, seed: int = 0
                    ) -> list[bytes]:
    """JPEGs of filled circles, rectangles and triangles on a textured background."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        field = rng.random((8, 8, 3), dtype=np.float32) * 255
        image = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
        image = np.ascontiguousarray(np.clip(image, 0, 255), dtype=np.uint8)
        for _ in range(int(rng.integers(2, 8))):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            size = int(rng.integers(min(width, height) // 12, min(width, height) // 3))
            cx, cy = int(rng.integers(size, width - size)), int(rng.integers(size, height - size))
            kind = rng.integers(0, 3)
            if kind == 0:
                cv2.circle(image, (cx, cy), size // 2, color, -1, cv2.LINE_AA)
            elif kind == 1:
                cv2.rectangle(image, (cx - size // 2, cy - size // 3),
                              (cx + size // 2, cy + size // 3), color, -1)
            else:
                points = np.asarray([[cx, cy - size // 2], [cx - size // 2, cy + size // 2],
                                     [cx + size // 2, cy + size // 2]], np.int32)
                cv2.fillPoly(image, [points], color, cv2.LINE_AA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        bodies.append(data.tobytes())
    return bodies


def folder_images(folder: Path, limit: int = 0) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no images in {folder}")
    return [p.read_bytes() for p in paths]


def content_type(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"
