from __future__ import annotations

import io
import struct
import subprocess
import sys

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.errors import ImageTooLarge, InvalidImage
from app.imaging import (
    decode,
    header_size,
    letterbox,
    prepare,
    stretch_resize,
    to_chw_float,
)
from app.postprocess import select
from tests.helpers import DEFAULT_MODEL, box_iou, encode, render_scene

SIZE = 320


def pil_reference(image_bgr: np.ndarray) -> np.ndarray:
    """The official pipeline: PIL RGB, Image.resize(BILINEAR), antialiased when shrinking."""
    pil = Image.fromarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
    return np.asarray(pil.resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def detect(session: ort.InferenceSession, image: np.ndarray, width: int, height: int
           ) -> list[tuple[int, tuple[float, ...], float]]:
    """Detections for (H, W, 3) uint8 RGB, or (3, H, W) float32 model-ready pixels."""
    pixels = (image if image.dtype == np.float32 else
              image.transpose(2, 0, 1).astype(np.float32) / 255)[None]
    labels, boxes, scores = session.run(
        None, {"images": pixels, "orig_target_sizes": np.asarray([[width, height]], np.int64)})
    found = select(labels[0], boxes[0], scores[0], width, height, None, 0.5, 100)
    return [(d.class_id, d.box, d.score) for d in found]


@pytest.mark.parametrize("seed", [3, 7, 11, 19])
def test_preprocessing_matches_pil_closely_enough_to_keep_detections(seed: int) -> None:
    image, _ = render_scene(seed)
    ours = cv2.cvtColor(stretch_resize(image, SIZE, SIZE), cv2.COLOR_BGR2RGB)
    reference = pil_reference(image)
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    print(f"seed {seed} {image.shape[1]}x{image.shape[0]}: mean abs diff {diff.mean():.3f}, "
          f"max {diff.max()} (of 255)")
    assert diff.mean() < 1.5
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    h, w = image.shape[:2]
    a, b = detect(session, ours, w, h), detect(session, reference, w, h)
    assert a, "the scene should have detections"
    # Scores near the 0.5 threshold may cross it; every confident one must be in both.
    for label, box, score in a:
        if score >= 0.6:
            assert any(la == label and box_iou(box, bb) > 0.9 for la, bb, _ in b), (label, box)


def test_prepare_gives_nchw_float_rgb_in_unit_range_and_original_size() -> None:
    image = np.zeros((100, 200, 3), np.uint8)
    image[..., 2] = 255  # pure red in BGR
    prepared = prepare(image, 64, 32)
    assert prepared.pixels.shape == (3, 32, 64) and prepared.pixels.dtype == np.float32
    assert prepared.pixels[0].min() == 1.0 and prepared.pixels[1:].max() == 0.0  # R first
    assert (prepared.width, prepared.height) == (200, 100)
    assert prepared.target_size_wh == (200, 100) and prepared.letterbox is None


def _chw_by_arithmetic(rgb: np.ndarray, mean: tuple[float, float, float] | None,
                       std: tuple[float, float, float] | None) -> np.ndarray:
    """What to_chw_float did before its lookup tables, as torchvision does it."""
    chw = rgb.transpose(2, 0, 1).astype(np.float32)
    chw /= np.float32(255)
    if mean is not None and std is not None:
        chw -= np.asarray(mean, np.float32)[:, None, None]
        chw /= np.asarray(std, np.float32)[:, None, None]
    return chw


@pytest.mark.parametrize("mean, std", [
    (None, None), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.123456789, 0.9, 0.0), (0.333333, 1.7, 0.01))])
def test_to_chw_float_gives_the_arithmetic_bits_for_every_value(
        mean: tuple[float, float, float] | None, std: tuple[float, float, float] | None) -> None:
    # Every value in every channel, in an odd size, into a new array and into a given one.
    rgb = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), -1).sum(-1)
    rgb = np.stack([np.roll(rgb, k, axis=0) for k in range(3)], -1).astype(np.uint8)
    expected = _chw_by_arithmetic(rgb, mean, std)
    assert to_chw_float(rgb, mean, std).view(np.uint32).tolist() == \
        expected.view(np.uint32).tolist()
    out = np.full((3, 256, 3), np.nan, np.float32)
    assert to_chw_float(rgb, mean, std, out) is out
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(ValueError):
        to_chw_float(rgb, mean, std, np.empty((3, 3, 256), np.float32))
    with pytest.raises(ValueError):  # grey, or with alpha: never a tensor half filled
        to_chw_float(rgb[..., 0], mean, std)
    with pytest.raises(ValueError):
        to_chw_float(np.dstack([rgb, rgb[..., :1]]), mean, std)


def test_opencv_runs_single_threaded_in_the_service() -> None:
    # Its pool's workers would spin between resizes that the decode threads run in parallel.
    assert cv2.getNumThreads() == 1


def test_letterbox_keeps_aspect_and_maps_back() -> None:
    image = np.full((100, 200, 3), 255, np.uint8)
    canvas, box = letterbox(image, 320, 320)
    assert canvas.shape == (320, 320, 3) and box.scale == 1.6 and box.pad_y == 80
    prepared = prepare(image, 320, 320, resize="letterbox", mean=(0.5, 0.5, 0.5),
                       std=(0.5, 0.5, 0.5))
    assert prepared.target_size_wh == (320, 320)
    assert prepared.pixels.max() == pytest.approx(1.0)  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_header_size_reads_every_supported_format(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (123, 45), (10, 20, 30)).save(buffer, fmt)
    assert header_size(buffer.getvalue()) == (123, 45)
    assert decode(buffer.getvalue(), 10_000).image.shape == (45, 123, 3)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # A PNG header claiming 20000x20000 with no pixel data: refused before any decode.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"
    with pytest.raises(ImageTooLarge):
        decode(bomb, 40_000_000)


# Found by the decode fuzzer in CI: a 53-byte PNG whose second chunk declares 4 GB. OpenCV 5
# allocates what a chunk declares before reading it, so this decode peaked at 4.1 GB of RSS.
CHUNK_OVERRUN_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000110000000908020000ffffffffffffff1d1749444154789c6300"
    "49454e44ae426082")


def test_a_png_chunk_longer_than_the_file_is_refused_without_allocating_it() -> None:
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak (pytest's) into ru_maxrss.
    probe = ("import sys; from app.errors import InvalidImage; "
             "from app.imaging import decode; from tests.soak import rss_mb\n"
             "try:\n    decode(bytes.fromhex(sys.argv[1]), 4_000_000)\n"
             "except InvalidImage:\n    pass\n"
             "print(int(rss_mb('self', peak=True)))")
    result = subprocess.run([sys.executable, "-c", probe, CHUNK_OVERRUN_PNG.hex()],
                            capture_output=True, text=True, check=True, timeout=60)
    peak_mb = int(result.stdout.split()[-1])
    assert peak_mb < 400, f"decoding 53 bytes peaked at {peak_mb} MB"
    with pytest.raises(InvalidImage, match="chunk"):
        decode(CHUNK_OVERRUN_PNG, 4_000_000)


def test_a_side_longer_than_opencv_accepts_is_too_large_not_an_opencv_error() -> None:
    # Found by `make fuzz`: a WebP canvas 1310721x1 passes the pixel limit, and cv2.imdecode
    # raised cv2.error (CV_IO_MAX_IMAGE_WIDTH) instead of returning None.
    webp = bytes.fromhex("524946463c33000057454250565038580a0000000000405700001400000000000000"
                         "00410046")
    assert header_size(webp) == (1310721, 1)
    with pytest.raises(ImageTooLarge, match="no side"):
        decode(webp, 4_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(np.zeros((8, 8, 3),
                                                                              np.uint8))[:40]])
def test_undecodable_bytes_are_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode(data, 1_000_000)


def test_awkward_images_become_8bit_bgr() -> None:
    gray16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    rgba = np.zeros((48, 64, 4), np.uint8)
    for array in (gray16, rgba, np.zeros((48, 64), np.uint8)):
        ok, png = cv2.imencode(".png", array)
        assert ok
        out = decode(png.tobytes(), 10_000).image
        assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    palette = io.BytesIO()
    Image.new("P", (64, 48), 3).save(palette, "PNG")
    assert decode(palette.getvalue(), 10_000).image.shape == (48, 64, 3)


def test_exif_orientation_is_applied() -> None:
    pil = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", exif=exif.tobytes())
    decoded = decode(buffer.getvalue(), 10_000)
    assert decoded.image.shape == (60, 20, 3) and (decoded.width, decoded.height) == (20, 60)


def test_reduced_scale_jpeg_decode_keeps_size_and_detections() -> None:
    """A large JPEG decoded at 1/2 or 1/4 scale (never below the model input) gives the same
    confident detections as the full decode, with boxes in the original's pixels."""
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    for seed, scale in ((3, 2.5), (11, 4.0), (19, 3.0)):
        small, _ = render_scene(seed)
        big = cv2.resize(small, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        data = encode(big)
        full = decode(data, 100_000_000)
        reduced = decode(data, 100_000_000, min_side=SIZE)
        assert (reduced.width, reduced.height) == (full.width, full.height) == (
            big.shape[1], big.shape[0])
        assert min(reduced.image.shape[:2]) >= SIZE
        assert reduced.image.shape[0] <= full.image.shape[0] // 2 + 1  # really reduced
        w, h = full.width, full.height
        a = detect(session, prepare(full.image, SIZE, SIZE).pixels, w, h)
        b = detect(session, prepare(reduced.image, SIZE, SIZE, original_size=(w, h)).pixels,
                   w, h)
        assert a
        for label, box, score in a:
            if score >= 0.6:
                assert any(la == label and box_iou(box, bb) > 0.9 for la, bb, _ in b)


def test_reduced_decode_keeps_the_original_size_of_exif_rotated_jpegs() -> None:
    pil = Image.new("RGB", (1600, 700), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", exif=exif.tobytes())
    decoded = decode(buffer.getvalue(), 10_000_000, min_side=320)
    assert (decoded.width, decoded.height) == (700, 1600)
    assert decoded.image.shape[:2] == (800, 350)
