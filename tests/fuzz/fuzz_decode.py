"""atheris fuzzing of the decode paths (exact: PIL; fast: OpenCV): bytes -> header check ->
decode -> preprocess.

Any exception other than the service's own errors (InvalidImage, ImageTooLarge,
UnsupportedImageFormat) is a crash.
    python tests/fuzz/fuzz_decode.py CORPUS_DIR -max_total_time=300     (make fuzz)
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from app.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
    from app.exact import open_rgb, prepare_exact
    from app.imaging import decode, header_size, prepare


def one_input(data: bytes) -> None:
    header_size(data)
    try:  # PREPROCESS=exact: PIL
        exact = prepare_exact(open_rgb(data, max_pixels=4_000_000), 64, 64)
        assert exact.pixels.shape == (3, 64, 64) and exact.width > 0 and exact.height > 0
    except (InvalidImage, ImageTooLarge, UnsupportedImageFormat):
        pass
    try:  # PREPROCESS=fast: OpenCV
        decoded = decode(data, max_pixels=4_000_000, min_side=64)
    except (InvalidImage, ImageTooLarge, UnsupportedImageFormat):
        return
    prepared = prepare(decoded.image, 64, 64, original_size=(decoded.width, decoded.height))
    assert prepared.pixels.shape == (3, 64, 64)
    assert decoded.width > 0 and decoded.height > 0


def write_seeds(folder: str) -> None:
    """A few tiny images of every supported format, for the fuzzer to mutate."""
    import io
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (17, 9), (200, 30, 90)).save(buffer, fmt)
        with open(os.path.join(folder, f"seed.{fmt.lower()}"), "wb") as f:
            f.write(buffer.getvalue())


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        write_seeds(sys.argv[1])
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
