"""EXIF orientation: how a photo is meant to be shown, read from its EXIF, and applied.

A phone photo taken in portrait is usually stored landscape with the tag "rotate 90 to show":
every viewer, browser and OpenCV's ``imdecode`` show it upright, while the official D-FINE
pipeline (``PIL.Image.open().convert("RGB")``) ignores the tag. The service applies it by
default (ORIENTATION=exif), so that the model sees what the user sees and the boxes are in
that frame; ORIENTATION=stored keeps the official behaviour.

Read from the EXIF of JPEG (APP1), PNG (eXIf) and WebP (EXIF) files by the header walk of
``app.imaging``; TIFF files are decoded as stored. A value outside 1..8 is ignored.
"""

from __future__ import annotations

import struct
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

OrientationMode = Literal["exif", "stored"]
ORIENTATION_TAG = 0x0112
MAX_IFD_ENTRIES = 512  # IFD0 holds a few dozen; a larger count is not a real EXIF block

# What each orientation's inverse is as a PIL transpose (as ``ImageOps.exif_transpose``).
_PIL_METHODS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}

A = TypeVar("A", bound=np.generic)


def tiff_orientation(block: bytes) -> int:
    """The orientation in a TIFF-structured EXIF block (its IFD0), 1 where absent or invalid."""
    if block.startswith(b"Exif\x00\x00"):
        block = block[6:]
    if block[:4] not in (b"II*\x00", b"MM\x00*") or len(block) < 8:
        return 1
    order = "<" if block[:2] == b"II" else ">"
    try:
        (offset,) = struct.unpack_from(order + "I", block, 4)
        (count,) = struct.unpack_from(order + "H", block, offset)
        for k in range(min(count, MAX_IFD_ENTRIES)):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", block, offset + 2 + 12 * k)
            if tag == ORIENTATION_TAG:
                if kind != 3:  # SHORT, as the standard says; anything else is ignored
                    return 1
                (orientation,) = struct.unpack(order + "H", value[:2])
                return orientation if 1 <= orientation <= 8 else 1
    except struct.error:  # cut short: as if absent
        return 1
    return 1


def swaps_sides(orientation: int) -> bool:
    """5 to 8 turn the image a quarter: its shown width is its stored height."""
    return orientation >= 5


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if swaps_sides(orientation) else (width, height)


def orient_array(image: npt.NDArray[A], orientation: int) -> npt.NDArray[A]:
    """An (H, W, C) image as it is meant to be shown: the same transposes as PIL's."""
    if orientation == 2:
        turned = image[:, ::-1]
    elif orientation == 3:
        turned = image[::-1, ::-1]
    elif orientation == 4:
        turned = image[::-1]
    elif orientation == 5:
        turned = image.transpose(1, 0, 2)
    elif orientation == 6:
        turned = np.rot90(image, k=-1)
    elif orientation == 7:
        turned = image.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        turned = np.rot90(image, k=1)
    else:
        return image
    return np.ascontiguousarray(turned)


def orient_pil(image: Image.Image, orientation: int) -> Image.Image:
    method = _PIL_METHODS.get(orientation)
    return image if method is None else image.transpose(method)
