"""PREPROCESS=exact: the official D-FINE pipeline, bit for bit.

``tools/inference/torch_inf.py`` and the COCO evaluation read an image with
``PIL.Image.open(f).convert("RGB")`` (pixels as stored: EXIF orientation is not applied; the
service applies it after, unless ORIENTATION=stored: app.orientation), resize
it with ``T.Resize((H, W))`` (PIL's bilinear, antialiased when shrinking), ``T.ToTensor()``
(divide by 255), and pass the original (width, height). Here the same calls, on the same
library. The header checks of ``app.imaging`` run first, so no bomb reaches PIL.

``fast`` (app.imaging) decodes with OpenCV (large JPEGs at reduced scale, EXIF applied) and
resizes with OpenCV: inputs differ from these by up to a few levels of 255.
"""

from __future__ import annotations

import io
import warnings
from typing import cast

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.errors import ImageTooLarge, InvalidImage
from app.imaging import (
    LETTERBOX_FILL,
    Header,
    Letterbox,
    PreparedImage,
    UInt8Image,
    check_header,
    is_rle_bmp,
    to_chw_float,
)
from app.orientation import OrientationMode, orient_pil

# PIL's own bomb check would warn or raise on sizes the service's MAX_PIXELS already allows or
# refuses: the service's check is the one that applies.
Image.MAX_IMAGE_PIXELS = None

# PIL decodes run-length encoded BMPs in Python, a pixel or a record at a time: a 210 KB RLE4
# BMP of 25 MP held a decode worker 3.2 s, a 16 MiB RLE8 of one-pixel runs 3.3 s. Within both
# bounds one costs at most about 0.25 s here (2 MP holds 1920x1080).
MAX_RLE_BMP_PIXELS = 1 << 21
MAX_RLE_BMP_BYTES = 1 << 19


def open_rgb(data: bytes, max_pixels: int, orientation: OrientationMode = "exif"
             ) -> Image.Image:
    """The upload as PIL decodes it, converted to RGB: ``Image.open(...).convert("RGB")``, then
    turned as its EXIF orientation says (``exif``; an image without a turning tag stays
    bit for bit the official pipeline's) or left as stored (``stored``, the official way)."""
    header = check_header(data, max_pixels)
    _check_rle_bmp(data, header)
    turn = header.orientation if orientation == "exif" else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd metadata; errors still raise
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:  # from the header, not decoded
                    raise ImageTooLarge(f"the image has {image.width}x{image.height} pixels; "
                                        f"the limit is {max_pixels} pixels")
                if image.width == 0 or image.height == 0:
                    raise InvalidImage("the image has a zero width or height")
                return orient_pil(image.convert("RGB"), turn)
    except (ImageTooLarge, InvalidImage):
        raise
    except MemoryError:
        raise
    except Exception as exc:  # PIL's decoders say "broken" with many exception types
        raise InvalidImage() from exc


def _check_rle_bmp(data: bytes, header: Header) -> None:
    """Refuse an RLE BMP over MAX_RLE_BMP_PIXELS or MAX_RLE_BMP_BYTES (413: the same image,
    smaller or uncompressed or as PNG, is accepted; the fast mode's C decoder takes any)."""
    if not is_rle_bmp(data):
        return
    size = header.size or (0, 0)
    if size[0] * size[1] > MAX_RLE_BMP_PIXELS:
        raise ImageTooLarge(f"the RLE-compressed BMP has {size[0]}x{size[1]} pixels; such BMPs "
                            f"are decoded up to {MAX_RLE_BMP_PIXELS} pixels (send it "
                            "uncompressed, or as PNG)")
    if len(data) > MAX_RLE_BMP_BYTES:
        raise ImageTooLarge(f"the RLE-compressed BMP is {len(data)} bytes; such BMPs are "
                            f"decoded up to {MAX_RLE_BMP_BYTES} bytes (send it uncompressed, "
                            "or as PNG)")


def prepare_exact(rgb: Image.Image, input_width: int, input_height: int,
                  resize: str = "stretch", mean: tuple[float, float, float] | None = None,
                  std: tuple[float, float, float] | None = None,
                  out: npt.NDArray[np.float32] | None = None,
                  box: tuple[int, int, int, int] | None = None) -> PreparedImage:
    """Model-ready pixels from a decoded RGB image, with PIL's bilinear resize (written into
    ``out`` when given). ``box`` (x1, y1, x2, y2): only that region, a tile (PIL's own
    region resize: no copy of it; the filter reads the pixels just beyond its edges)."""
    width, height = rgb.size if box is None else (box[2] - box[0], box[3] - box[1])
    if resize == "letterbox":
        scale = min(input_width / width, input_height / height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new("RGB", (input_width, input_height), (LETTERBOX_FILL,) * 3)
        pad_x, pad_y = (input_width - new_w) // 2, (input_height - new_h) // 2
        canvas.paste(rgb.resize((new_w, new_h), Image.Resampling.BILINEAR, box=box),
                     (pad_x, pad_y))
        return PreparedImage(to_chw_float(_array(canvas), mean, std, out), width, height,
                             (input_width, input_height), Letterbox(scale, pad_x, pad_y))
    resized = rgb.resize((input_width, input_height), Image.Resampling.BILINEAR, box=box)
    return PreparedImage(to_chw_float(_array(resized), mean, std, out), width, height,
                         (width, height))


def bgr(rgb: Image.Image) -> UInt8Image:
    """(H, W, 3) BGR for OpenCV drawing."""
    return cast(UInt8Image, np.ascontiguousarray(_array(rgb)[..., ::-1]))


def _array(image: Image.Image) -> UInt8Image:
    return cast(UInt8Image, np.asarray(image, np.uint8))
