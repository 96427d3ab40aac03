"""Photos stored turned, with the EXIF orientation (1-8) that turns them upright again: the
eight ways a camera stores a picture, built from a rendered scene whose boxes are known."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from app.orientation import orient_array
from tests.helpers import render_scene

# Storing a picture upright-after-orientation-k means applying k's inverse: quarter turns
# invert each other, the flips and the two diagonal mirrors are their own inverses.
INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}
SCENE_SEED = 33


def upright_scene() -> tuple[np.ndarray, list[tuple[str, tuple[float, ...]]]]:
    """The scene as it is meant to be seen (BGR), and its boxes in that frame."""
    return render_scene(SCENE_SEED)


def stored_jpeg(orientation: int, tag: int | None = None, scale: float = 1.0) -> bytes:
    """The upright scene stored as orientation ``orientation`` stores it, tagged ``tag``
    (default: the orientation itself)."""
    image = upright_scene()[0]
    if scale != 1.0:
        h, w = image.shape[:2]
        image = np.asarray(Image.fromarray(image).resize((int(w * scale), int(h * scale))))
    stored = orient_array(image, INVERSE[orientation])[..., ::-1]  # to RGB for PIL
    exif = Image.Exif()
    exif[0x0112] = orientation if tag is None else tag
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buffer, "JPEG", quality=95,
                                                        exif=exif.tobytes())
    return buffer.getvalue()


def alike(a: np.ndarray, b: np.ndarray) -> bool:
    """The same picture up to JPEG noise: equal shapes, close at 1/16 of the resolution (the
    scene's texture is noisy pixel by pixel)."""
    if a.shape != b.shape:
        return False
    size = (a.shape[1] // 16, a.shape[0] // 16)
    small = [cv2.resize(x, size, interpolation=cv2.INTER_AREA).astype(int) for x in (a, b)]
    return float(np.abs(small[0] - small[1]).mean()) < 3
