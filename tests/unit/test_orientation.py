"""EXIF orientation: read from JPEG, PNG and WebP headers, applied the way PIL applies it,
invalid values ignored; and the bounded header walks that read it."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.errors import InvalidImage
from app.exact import open_rgb
from app.imaging import (
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    PNG_SIGNATURE,
    check_header,
    decode,
    read_header,
)
from app.orientation import orient_array, tiff_orientation
from tests.orientation_images import alike, stored_jpeg, upright_scene


def exif_block(value: int, kind: int = 3) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    block = exif.tobytes()
    if kind != 3:  # rewrite the entry's type field
        order = "<" if b"II*\x00" in block[:10] else ">"
        index = block.index(struct.pack(order + "HH", 0x0112, 3))
        block = block[:index + 2] + struct.pack(order + "H", kind) + block[index + 4:]
    return block


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_turns_as_pil_turns_it(orientation: int) -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    pil = Image.fromarray(image)
    pil.getexif()[0x0112] = orientation
    want = np.asarray(ImageOps.exif_transpose(pil))
    np.testing.assert_array_equal(orient_array(image, orientation), want)


def test_invalid_or_mistyped_orientation_values_are_ignored() -> None:
    assert tiff_orientation(exif_block(6)) == 6
    for bad in (0, 9, 255, 65535):
        assert tiff_orientation(exif_block(bad)) == 1
    assert tiff_orientation(exif_block(6, kind=4)) == 1  # LONG, not SHORT
    assert tiff_orientation(b"II*\x00\xff\xff\xff\xff") == 1  # IFD offset past the end
    assert tiff_orientation(b"garbage") == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_orientation_is_read_from_jpeg_png_and_webp(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buffer, fmt, exif=exif_block(6))
    header = read_header(buffer.getvalue())
    assert header.size == (40, 20) and header.orientation == 6
    assert decode(buffer.getvalue(), 10_000).image.shape[:2] == (40, 20)  # turned: 20 wide
    assert decode(buffer.getvalue(), 10_000, orientation="stored").image.shape[:2] == (20, 40)
    assert open_rgb(buffer.getvalue(), 10_000).size == (20, 40)
    assert open_rgb(buffer.getvalue(), 10_000, "stored").size == (40, 20)


def test_both_decoders_turn_a_photo_upright_alike() -> None:
    upright = upright_scene()[0]
    for orientation in range(1, 9):
        data = stored_jpeg(orientation)
        fast = decode(data, 10_000_000).image
        exact = np.asarray(open_rgb(data, 10_000_000))[..., ::-1]
        assert alike(fast, upright) and alike(exact, upright), orientation
        stored = decode(data, 10_000_000, orientation="stored").image
        assert (orientation == 1) == alike(stored, upright)


def test_a_reduced_scale_decode_reports_the_turned_original_size() -> None:
    data = stored_jpeg(6, scale=3.0)  # large enough for a 1/2 or 1/4 decode at min side 320
    h, w = upright_scene()[0].shape[:2]
    decoded = decode(data, 50_000_000, min_side=320)
    assert (decoded.width, decoded.height) == (3 * w, 3 * h)
    assert decoded.image.shape[0] < 3 * h  # decoded smaller, and upright
    assert (decoded.image.shape[1] > decoded.image.shape[0]) == (w > h)


def jpeg(*segments: bytes, sof: bytes = b"\xff\xc0\x00\x11\x08\x4e\x20\x4e\x20\x03"
         + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00") -> bytes:
    return b"\xff\xd8" + b"".join(segments) + sof + b"\xff\xda\x00\x02" + b"\x00" * 8


def test_the_jpeg_walk_finds_the_frame_header_as_libjpeg_does() -> None:
    # 20000 x 20000 declared behind FF 00 garbage (libjpeg skips it): found and refused.
    with pytest.raises(Exception, match="20000x20000"):
        check_header(jpeg(b"\xff\x00\x12\x34"), 25_000_000)
    with pytest.raises(InvalidImage, match="no readable frame header"):
        check_header(b"\xff\xd8\xff\xda\x00\x02" + b"\x00" * 300, 25_000_000)
    with pytest.raises(InvalidImage, match="two frame headers"):
        check_header(jpeg(sof=b"\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00" * 2),
                     25_000_000)


def test_header_walks_stop_at_millions_of_empty_records() -> None:
    with pytest.raises(InvalidImage, match="segments"):
        check_header(jpeg(b"\xff\xe0\x00\x02" * (MAX_JPEG_SEGMENTS + 1)), 25_000_000)
    with pytest.raises(InvalidImage, match="segments"):
        check_header(jpeg(b"\xff\x00" * (MAX_JPEG_SEGMENTS + 1)), 25_000_000)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    empty_chunk = struct.pack(">I4s", 0, b"prIv") + b"\x00" * 4
    crowded = png[:33] + empty_chunk * MAX_PNG_CHUNKS + png[33:]
    assert crowded.startswith(PNG_SIGNATURE)
    with pytest.raises(InvalidImage, match="chunks"):
        check_header(crowded, 25_000_000)
    check_header(png[:33] + empty_chunk * 100 + png[33:], 25_000_000)  # a few are fine


def test_a_gif_of_millions_of_comment_blocks_is_refused_before_pil_reads_them() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, "GIF")
    gif = buffer.getvalue()
    flags = gif[10]
    start = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    comments = b"\x21\xfe" + b"\x01x" * 100 + b"\x00"  # one extension of 100 sub-blocks
    check_header(gif[:start] + comments * 10 + gif[start:], 25_000_000)  # 1,000: fine
    assert open_rgb(gif[:start] + comments * 10 + gif[start:], 25_000_000).size == (64, 48)
    with pytest.raises(InvalidImage, match="blocks"):  # 4.4 s of PIL for 3M before
        check_header(gif[:start] + comments * 50 + gif[start:], 25_000_000)
