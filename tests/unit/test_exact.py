"""PREPROCESS=exact against the official pipeline: PIL's Image.open(...).convert("RGB"),
Image.resize(BILINEAR) as torchvision's T.Resize does, and T.ToTensor's division (in torch)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import ImageTooLarge, InvalidImage
from app.exact import open_rgb, prepare_exact
from tests.helpers import encode, render_scene

SIZE = 320


def official(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """torch_inf.py's preprocessing: the tensor and orig_target_sizes (w, h)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    resized = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)  # T.Resize on PIL
    tensor = torch.from_numpy(np.array(resized)).permute(2, 0, 1).to(torch.float32).div(255)
    return tensor.numpy(), image.size


def pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def scene(width: int, height: int) -> Image.Image:
    rgb = render_scene(8)[0][..., ::-1]
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": the official pipeline does not
    return pil_bytes(scene(640, 400), "JPEG", exif=exif.tobytes(), quality=92)


CASES = {
    "upscaled jpeg": lambda: pil_bytes(scene(200, 150), "JPEG", quality=90),
    "downscaled jpeg": lambda: pil_bytes(scene(1600, 1200), "JPEG", quality=90),
    "large photo-sized jpeg": lambda: encode(np.asarray(scene(4032, 3024))[..., ::-1]),
    "odd-sized png": lambda: pil_bytes(scene(333, 517), "PNG"),
    "exif-rotated jpeg": exif_rotated,
    "grayscale png": lambda: pil_bytes(scene(300, 200).convert("L"), "PNG"),
    "palette gif": lambda: pil_bytes(scene(300, 200).convert("P"), "GIF"),
    "rgba webp": lambda: pil_bytes(scene(300, 200).convert("RGBA"), "WEBP", lossless=True),
    "cmyk jpeg": lambda: pil_bytes(scene(300, 200).convert("CMYK"), "JPEG"),
    "16-bit png": lambda: pil_bytes(Image.fromarray(
        np.asarray(scene(120, 90).convert("L")).astype(np.uint16) * 257), "PNG"),
    "bmp": lambda: pil_bytes(scene(301, 199), "BMP"),
    "tiff": lambda: pil_bytes(scene(257, 255), "TIFF"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_tensor_is_the_official_pipelines_bit_for_bit(case: str) -> None:
    data = CASES[case]()
    want, size = official(data)
    # Bit for bit by default where no tag turns the image; a turned one with ORIENTATION=stored.
    mode = "stored" if case == "exif-rotated jpeg" else "exif"
    got = prepare_exact(open_rgb(data, 50_000_000, mode), SIZE, SIZE)
    assert got.pixels.dtype == np.float32 and got.pixels.shape == (3, SIZE, SIZE)
    assert np.array_equal(got.pixels, want), np.abs(got.pixels - want).max()
    assert got.target_size_wh == size == (got.width, got.height)


def test_exif_orientation_is_applied_unless_stored_is_asked_as_the_official_pipeline_does(
        ) -> None:
    assert prepare_exact(open_rgb(exif_rotated(), 50_000_000), SIZE, SIZE).target_size_wh == (
        400, 640)
    assert prepare_exact(open_rgb(exif_rotated(), 50_000_000, "stored"), SIZE,
                         SIZE).target_size_wh == (640, 400)


def test_exact_decoding_keeps_the_header_checks() -> None:
    with pytest.raises(ImageTooLarge):
        open_rgb(pil_bytes(scene(300, 200), "PNG"), 50_000)
    with pytest.raises(InvalidImage):
        open_rgb(pil_bytes(scene(300, 200), "JPEG")[:400], 50_000_000)
    with pytest.raises(InvalidImage):
        open_rgb(b"not an image at all", 50_000_000)
