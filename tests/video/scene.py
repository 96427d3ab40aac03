"""A deterministic synthetic video: three shapes of the shipped model's three classes, each
moving back and forth in its own horizontal lane, so their paths never cross or overlap (a
correct tracker keeps one id per path) and every frame index ``k`` has a known truth.

Drawn as ``models/synthetic.py`` draws (filled, anti-aliased, flat colours, 17-30% of the
shorter side) on a static gradient. The shipped model detects every shape on every frame
(``tests/video/test_sources.py`` checks it through a real server).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

WIDTH, HEIGHT = 640, 480
CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle")  # the model's class ids

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
Image = npt.NDArray[np.uint8]

_SHIFT = 4  # OpenCV's fixed-point bits: sub-pixel positions, so motion is smooth
_MARGIN = 16.0  # px kept free at the frame's left and right edges

# The scene repeats every PERIOD frames (every path's period divides it), so checking frames
# 0..PERIOD-1 checks every frame there is.
PERIOD = 600


@dataclass(frozen=True)
class _Path:
    class_id: int
    half_w: float  # the shape's half extent, which its box is
    half_h: float
    lane_y: float  # the box centre's y
    period: int  # frames for one trip there and back (divides PERIOD)
    phase: int  # frames already travelled at frame 0, so the shapes do not move in step
    bgr: tuple[int, int, int]

    @property
    def span(self) -> float:
        return WIDTH - 2 * (_MARGIN + self.half_w)

    @property
    def speed(self) -> float:
        """Px per frame."""
        return 2 * self.span / self.period

    def centre(self, k: int) -> tuple[float, float]:
        """Back and forth along the lane at a constant speed: a triangle wave, bounded and
        periodic, so any k is valid."""
        t = (k + self.phase) % self.period / self.period  # in [0, 1)
        return _MARGIN + self.half_w + self.span * (2 * t if t < 0.5 else 2 - 2 * t), self.lane_y


# An upward triangle of circumradius R: x within ±R·sin60, y from -R to +R/2 about its centroid.
_TRIANGLE_R = 52.0
# One lane per shape, in its own third of the frame: the boxes never overlap. Speeds 4.9, 3.1
# and 5.2 px per frame. Sizes, colours and lanes are tuned: the model's score for a shape
# varies with where it is (two queries can split one object's score), and these leave every
# shape's best detection at 0.75 or more on every frame of the period (0.78 measured).
_PATHS: tuple[_Path, ...] = (
    _Path(0, 60.0, 60.0, 82.0, 200, 0, (40, 40, 220)),  # red circle, 120 px
    _Path(1, 70.0, 40.0, 240.0, 300, 110, (200, 120, 20)),  # blue rectangle, 140x80
    _Path(2, _TRIANGLE_R * math.sqrt(3) / 2, _TRIANGLE_R * 0.75, 388.0, 200, 60,
          (30, 200, 230)),  # yellow triangle, 90x78
)
assert all(PERIOD % p.period == 0 for p in _PATHS)


@functools.cache
def _background() -> Image:
    """A plain, dark vertical slate gradient: static, cheap to encode (a PNG frame is ~10 KB,
    600 frames of H.264 under 1 MB), and far from every shape's colour in brightness too, so
    that a codec's coarse chroma (mp4v) leaves no coloured fringes to be taken for shapes."""
    ys = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None, None]
    top = np.array([60, 50, 40], np.float32)
    bottom = np.array([95, 90, 80], np.float32)
    gradient = np.broadcast_to(top + (bottom - top) * ys, (HEIGHT, WIDTH, 3))
    out: Image = gradient.astype(np.uint8)  # truncated: the levels the tuning measured
    out.flags.writeable = False
    return out


def _fixed(value: float) -> int:
    return round(value * (1 << _SHIFT))


def truth(k: int) -> list[tuple[int, Box]]:
    """Each shape's (class_id, xyxy box) on frame ``k``, one per path, always in the same order
    (the list index is the path's identity)."""
    boxes: list[tuple[int, Box]] = []
    for path in _PATHS:
        x, y = path.centre(k % PERIOD)  # exactly periodic, whatever float rounding does
        boxes.append((path.class_id,
                      (x - path.half_w, y - path.half_h, x + path.half_w, y + path.half_h)))
    return boxes


def frame(k: int) -> Image:
    """Frame ``k`` as a BGR uint8 image of HEIGHT x WIDTH, the same every time."""
    image = _background().copy()
    for path, (_, (x1, y1, x2, y2)) in zip(_PATHS, truth(k)):
        if path.class_id == 0:  # circle
            centre = (_fixed((x1 + x2) / 2), _fixed((y1 + y2) / 2))
            cv2.circle(image, centre, _fixed(path.half_w), path.bgr, -1, cv2.LINE_AA, _SHIFT)
        elif path.class_id == 1:  # axis-aligned rectangle
            corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)
            cv2.fillPoly(image, [np.round(corners * (1 << _SHIFT)).astype(np.int32)], path.bgr,
                         cv2.LINE_AA, _SHIFT)
        else:  # triangle, apex up; the box's top is the apex, its bottom the base
            cx, top, bottom = (x1 + x2) / 2, y1, y2
            corners = np.array([[cx, top], [x2, bottom], [x1, bottom]], np.float64)
            cv2.fillPoly(image, [np.round(corners * (1 << _SHIFT)).astype(np.int32)], path.bgr,
                         cv2.LINE_AA, _SHIFT)
    return image


def write_video(path: Path, frames: int, fps: float, codec: str = "mp4v") -> None:
    """Frames 0..frames-1 written by OpenCV's VideoWriter (``mp4v`` in .mp4 and ``MJPG`` in
    .avi work with opencv-python-headless's bundled FFmpeg)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec!r} to {path}")
    try:
        for k in range(frames):
            writer.write(frame(k))
    finally:
        writer.release()


def write_h264(path: Path, frames: int, fps: float) -> None:
    """Frames 0..frames-1 as H.264 (libx264, yuv420p, a keyframe every 10 frames, no B-frames,
    zerolatency) in the container the suffix names (.mkv or .mp4): what the RTSP server plays,
    and a client joining at any time gets a keyframe within 10 frames."""
    import av

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = 1 / rate
        stream.options = {"tune": "zerolatency", "preset": "veryfast", "g": "10",
                          "keyint_min": "10", "bf": "0", "crf": "20"}
        for k in range(frames):
            picture = av.VideoFrame.from_ndarray(frame(k), format="bgr24")
            picture.pts = k
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
