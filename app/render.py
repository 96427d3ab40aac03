"""Drawing detections onto an image (OpenCV), and encoding it as JPEG or PNG."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from app.postprocess import Detection

ImageFormat = Literal["jpeg", "png"]

# Well-separated colours (BGR), one per class id, cycling.
PALETTE = ((56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207),
           (10, 249, 72), (23, 204, 146), (134, 219, 61), (211, 188, 0), (255, 194, 0),
           (255, 115, 100), (236, 24, 0), (255, 56, 132), (199, 55, 255), (255, 149, 200))


def draw(image_bgr: np.ndarray, detections: list[Detection]) -> np.ndarray:
    """A copy of ``image_bgr`` with each detection's box and "label score" drawn on it; line
    and text sizes follow the image size."""
    canvas = image_bgr.copy()
    scale = max(canvas.shape[:2]) / 1000
    thickness = max(1, round(2 * scale))
    font_scale = max(0.4, 0.6 * scale)
    for det in sorted(detections, key=lambda d: d.score):  # the best drawn last, on top
        color = PALETTE[det.class_id % len(PALETTE)]
        x1, y1, x2, y2 = (round(v) for v in det.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        text = f"{det.label} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(canvas, text, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX,
                    font_scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas


def encode(image_bgr: np.ndarray, fmt: ImageFormat) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == "jpeg" else []
    ok, data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", image_bgr, params)
    if not ok:
        raise RuntimeError(f"cannot encode {fmt}")
    return bytes(data.tobytes())


def negotiate(requested: str | None, accept: str) -> ImageFormat:
    """``?format=`` wins; else PNG only if Accept prefers it over JPEG; JPEG by default."""
    if requested:
        return "png" if requested.lower() == "png" else "jpeg"
    accept = accept.lower()
    if "image/png" in accept and ("image/jpeg" not in accept
                                  or accept.index("image/png") < accept.index("image/jpeg")):
        return "png"
    return "jpeg"
