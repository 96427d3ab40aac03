"""Decode, size-check and preprocess images: plain functions on bytes and arrays.

The preprocessing matches the official D-FINE evaluation pipeline: RGB, stretch to the model's
input size (no letterbox) with antialiased shrinking, values /255, NCHW float32, and the
original (width, height) passed to the model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import cv2
import numpy as np
import numpy.typing as npt

from app.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from app.orientation import OrientationMode, orient_array, oriented_size, tiff_orientation

# OpenCV's own thread pool off: the service decodes on a pool of its own (one image a thread),
# and OpenCV's idle pool workers spin on sched_yield between the resizes they share. Under load
# that spinning cost more than a tiny image's decode and resize together (docs/performance.md).
cv2.setNumThreads(1)

LETTERBOX_FILL = 114  # the grey YOLO-style letterboxing pads with

UInt8Image = npt.NDArray[np.uint8]

MAX_SIDE = 1 << 20  # OpenCV's CV_IO_MAX_IMAGE_WIDTH and _HEIGHT: it refuses longer sides
# A progressive JPEG is decoded once per scan: 1,000 one-byte scans of a 16 MP image took 10 s
# here. Encoders write about 10 (libjpeg's default progression; mozjpeg a few more).
MAX_JPEG_SCANS = 64
SUPPORTED_FORMATS = "JPEG, PNG, GIF, BMP, WebP or TIFF"
# Formats OpenCV would decode but whose headers are not read here, so their pixel count could
# not be checked before OpenCV allocates it (a 2.6 KB JPEG 2000 of 16000x16000 took 3.7 GB):
# refused with 415 by their signature. Anything else that is no supported format is refused
# with 400 before OpenCV sees it.
_REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xffO\xffQ", "JPEG 2000"),
    (4, b"ftypavif", "AVIF"), (4, b"ftypavis", "AVIF"), (4, b"ftypheic", "HEIF"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"#?RADIANCE", "Radiance HDR"), (0, b"#?RGBE", "Radiance HDR"),
    (0, b"v/1\x01", "OpenEXR"), (0, b"Y\xa6j\x95", "Sun raster"),
    (0, b"PF\n", "PFM"), (0, b"Pf\n", "PFM"), (0, b"PF\r", "PFM"), (0, b"Pf\r", "PFM"),
    (0, b"II+\x00", "BigTIFF"), (0, b"MM\x00+", "BigTIFF"),
)


@dataclass(frozen=True)
class Letterbox:
    """Maps boxes from the model's input pixels back to the original: (x - pad_x) / scale."""

    scale: float
    pad_x: float
    pad_y: float


@dataclass
class PreparedImage:
    pixels: npt.NDArray[np.float32]  # (3, H, W), RGB, model-ready
    width: int  # original image size, pixels
    height: int
    target_size_wh: tuple[int, int]  # what the model receives as orig_target_sizes
    letterbox: Letterbox | None = None


# Header walks are Python loops: a file of millions of empty segments or chunks would hold a
# decode worker for many seconds (PIL's own walk too), so each walk is bounded, far above what
# encoders write (a JPEG has a dozen segments before its scan, a camera's a few dozen; libpng
# writes 8 KiB IDAT chunks, 2,048 for a 16 MiB file; a GIF a handful of extension blocks).
MAX_JPEG_SEGMENTS = 1000
MAX_PNG_CHUNKS = 16384
MAX_WEBP_CHUNKS = 1000
MAX_GIF_BLOCKS = 4096  # extension sub-blocks before the first image (PIL reads them in Python)
# PIL parses each "8BIM" resource of a Photoshop APP13 segment in Python: 255 segments packed
# with empty resources (16 MiB) cost 1 s. Photoshop writes a few dozen.
MAX_PHOTOSHOP_RESOURCES = 4096
# TIFF: PIL reads every entry of a directory, unpacks every value of the EXIF, GPS and Interop
# directories and those of the tags it reads (a fraction is a Python object each), and builds
# one tile per strip or tile in a Python loop: a 1x2 image with 1.86M strip offsets held a
# decode worker 15 s, 2M fractions in XResolution 4.6 s. libtiff's 8 KiB strips are 9,200 for
# a 25 MP RGB image; a directory holds a few dozen entries, a handful of fractions.
MAX_TIFF_ENTRIES = 1000  # in one directory
MAX_TIFF_STRIPS = 32768  # strips or tiles (the length of their offset and byte-count tables)
MAX_TIFF_NUMBERS = 1 << 20  # numbers in all other entries together (a colour map: 768)
MAX_TIFF_FRACTIONS = 4096  # RATIONAL and SRATIONAL values in all entries together


@dataclass(frozen=True)
class Header:
    """What the header walk found: (width, height) as stored, None where the format's header
    is not read here (GIF, BMP, TIFF sizes are; see header_size), and the EXIF orientation."""

    size: tuple[int, int] | None
    orientation: int = 1


def _jpeg_header(data: bytes) -> tuple[tuple[int, int] | None, int]:
    """The frame size and EXIF orientation, found as libjpeg finds them: markers read up to the
    first scan, bytes that are no marker skipped (libjpeg discards them, so a header hidden
    after ``FF 00`` garbage is still read), the first frame header the size."""
    size: tuple[int, int] | None = None
    orientation = 1
    i, end, steps, resources = 2, len(data), 0, 0
    while True:
        start = data.find(b"\xff", i)
        if start < 0:
            break
        k = start + 1
        while k < end and data[k] == 0xFF:  # fill bytes
            k += 1
        if k >= end:
            break
        marker, i = data[k], k + 1
        steps += 1
        if steps > MAX_JPEG_SEGMENTS:
            raise InvalidImage(f"the JPEG header has more than {MAX_JPEG_SEGMENTS} segments")
        if marker == 0x00 or marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue  # FF 00 (no marker), SOI, TEM, RSTn: no length field
        if marker in (0xDA, 0xD9):  # start of scan, end of image: the header is over
            break
        if i + 2 > end:
            break
        (length,) = struct.unpack_from(">H", data, i)
        if length < 2:
            raise InvalidImage("the JPEG header has a segment of impossible length")
        body = data[i + 2:i + length]
        # SOFn markers (not DHT C4, JPG C8, DAC CC) hold precision, height, width.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if size is not None:  # libjpeg refuses a second one; PIL would believe it
                raise InvalidImage("the JPEG has two frame headers")
            if len(body) >= 5:
                height, width = struct.unpack_from(">HH", body, 1)
                size = (width, height)
        elif marker == 0xE1 and orientation == 1 and body.startswith(b"Exif\x00\x00"):
            orientation = tiff_orientation(body)
        elif marker == 0xED and body.startswith(b"Photoshop 3.0\x00"):
            resources += body.count(b"8BIM")  # an upper bound of what PIL's loop reads
            if resources > MAX_PHOTOSHOP_RESOURCES:
                raise InvalidImage("the JPEG has more than "
                                   f"{MAX_PHOTOSHOP_RESOURCES} Photoshop resources")
        i += length
    return size, orientation


def _tiff_size_tags(data: bytes) -> list[tuple[int, int]]:
    """(tag, value) of the ImageWidth (256) and ImageLength (257) entries of the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    if offset + 2 > len(data):
        return []
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    found = []
    for k in range(min(count, MAX_TIFF_ENTRIES)):  # the walk refuses a longer directory
        entry = data[offset + 2 + 12 * k: offset + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # SHORT (3) or LONG (4)
            fmt = "H" if kind == 3 else "I"
            found.append((tag, struct.unpack(order + fmt, entry[8:8 + struct.calcsize(fmt)])[0]))
    return found


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    size = dict(reversed(_tiff_size_tags(data)))  # the first of each tag
    if 256 in size and 257 in size:
        return size[256], size[257]
    return None


_TIFF_TABLES = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_TIFF_FRACTIONS = (5, 10)  # RATIONAL, SRATIONAL
_TIFF_BYTES = (1, 2, 7)  # BYTE, ASCII, UNDEFINED: PIL keeps them as one bytes or str object
# Directories PIL reads besides the first: EXIF and GPS from it, Interop from EXIF's.
_TIFF_SUB_DIRECTORIES = {0: (34665, 34853), 34665: (40965,)}


@dataclass
class _TiffCounts:
    """What the walk has counted so far, across the directories PIL reads."""

    numbers: int = 0
    fractions: int = 0


TiffEntry = tuple[int, int, int, bytes]


def _tiff_entries(data: bytes, offset: int, order: str) -> list[TiffEntry]:
    """(tag, type, count, the 4 bytes of its value or offset) of each entry of the directory
    at ``offset``, refused past MAX_TIFF_ENTRIES before any is read; a directory cut short
    yields the entries present (what PIL reads of it)."""
    if offset + 2 > len(data):
        return []
    (count,) = struct.unpack_from(order + "H", data, offset)
    if count > MAX_TIFF_ENTRIES:
        raise InvalidImage(f"a TIFF directory has {count} entries; at most "
                           f"{MAX_TIFF_ENTRIES} are read")
    table = data[offset + 2:offset + 2 + 12 * count]
    return list(struct.iter_unpack(order + "HHI4s", table[:len(table) // 12 * 12]))


def _tiff_count(entries: list[TiffEntry], counts: _TiffCounts) -> None:
    for tag, kind, count, _ in entries:
        if tag in _TIFF_TABLES:
            if count > MAX_TIFF_STRIPS:
                raise InvalidImage(f"the TIFF has {count} strips or tiles; at most "
                                   f"{MAX_TIFF_STRIPS} are decoded")
        elif kind in _TIFF_FRACTIONS:
            counts.fractions += count
        elif kind not in _TIFF_BYTES:
            counts.numbers += count
    if counts.fractions > MAX_TIFF_FRACTIONS:
        raise InvalidImage(f"the TIFF's directories hold more than {MAX_TIFF_FRACTIONS} "
                           "fractions")
    if counts.numbers > MAX_TIFF_NUMBERS:
        raise InvalidImage(f"the TIFF's directories hold more than {MAX_TIFF_NUMBERS} numbers")


def _tiff_walk(data: bytes) -> None:
    """Refuse a TIFF whose first directory, or the EXIF, GPS and Interop directories PIL reads
    with it, would hold a decode worker in PIL's Python loops (see MAX_TIFF_ENTRIES): counts
    read from the entries' headers, values never unpacked; four directories at most."""
    order = "<" if data[:2] == b"II" else ">"
    (first,) = struct.unpack_from(order + "I", data, 4)
    counts = _TiffCounts()
    pending, seen = [(0, first)], set()
    while pending:
        kind, offset = pending.pop()
        if offset in seen:
            continue
        seen.add(offset)
        entries = _tiff_entries(data, offset, order)
        _tiff_count(entries, counts)
        pending += _tiff_sub_directories(data, order, entries,
                                         _TIFF_SUB_DIRECTORIES.get(kind, ()))


# How PIL reads a pointer of each integer type: within the entry, or (8 bytes) where it points.
_TIFF_POINTER_FORMATS = {3: "H", 4: "I", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}


def _tiff_sub_directories(data: bytes, order: str, entries: list[TiffEntry],
                          tags: tuple[int, ...]) -> list[tuple[int, int]]:
    """(tag, offset) of the directories these entries point to, read as PIL reads them: the
    first entry of each tag only (PIL ignores a repeated one), its value as its type says."""
    found: dict[int, int] = {}
    for tag, kind, count, raw in entries:
        fmt = _TIFF_POINTER_FORMATS.get(kind)
        if tag not in tags or tag in found or count != 1 or fmt is None:
            continue
        if struct.calcsize(fmt) > 4:
            (at,) = struct.unpack(order + "I", raw)
            raw = data[at:at + 8]
            if len(raw) < 8:
                continue
        (found[tag],) = struct.unpack_from(order + fmt, raw)
    return [(tag, offset) for tag, offset in found.items() if offset >= 0]


def check_format(data: bytes) -> None:
    """Refuse what is not one of the supported formats before any decoder sees it: formats
    OpenCV could decode but whose size is not checked here (415), anything else (400), and
    JPEGs with more scans than MAX_JPEG_SCANS (400)."""
    for offset, signature, name in _REFUSED_SIGNATURES:
        if data[offset:offset + len(signature)] == signature:
            raise UnsupportedImageFormat(f"{name} images are not accepted; send "
                                         f"{SUPPORTED_FORMATS}")
    if data[:1] == b"P" and data[1:2] in _PNM_KINDS and data[2:3].isspace():
        raise UnsupportedImageFormat(f"PNM images are not accepted; send {SUPPORTED_FORMATS}")
    if not data.startswith(_SUPPORTED_SIGNATURES):
        raise InvalidImage(f"the data is not a {SUPPORTED_FORMATS} image")
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        try:
            tags = [tag for tag, _ in _tiff_size_tags(data)]
        except struct.error:
            tags = []
        if len(tags) != len(set(tags)):  # which one a decoder believes is its own choice
            raise InvalidImage("the TIFF header repeats its width or height")
    # 0xFF 0xDA (start of scan) cannot occur inside entropy-coded data (0xFF is stuffed there).
    scans = data.count(b"\xff\xda") if data[:2] == b"\xff\xd8" else 0
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are decoded")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNM_KINDS = (b"1", b"2", b"3", b"4", b"5", b"6", b"7")
_SUPPORTED_SIGNATURES = (PNG_SIGNATURE, b"\xff\xd8", b"GIF87a", b"GIF89a", b"BM", b"RIFF",
                         b"II*\x00", b"MM\x00*")


def _png_walk(data: bytes) -> int:
    """Walk a PNG's chunks: refuse one that declares more bytes than the file holds (OpenCV 5's
    PNG reader allocates a chunk's declared length before reading it: a 50-byte file declaring
    4 GB cost gigabytes) and more than MAX_PNG_CHUNKS of them; returns the eXIf orientation."""
    offset, end, chunks, orientation = 8, len(data), 0, 1
    while offset + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, offset)
        if offset + 12 + length > end:  # length, type, data, CRC
            raise InvalidImage("the PNG file is truncated: a chunk runs past its end")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidImage(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"eXIf" and orientation == 1:
            orientation = tiff_orientation(data[offset + 8:offset + 8 + length])
        offset += 12 + length
        if kind == b"IEND":
            break
    return orientation


def _gif_walk(data: bytes) -> None:
    """Refuse a GIF with more than MAX_GIF_BLOCKS extension sub-blocks before its first image:
    PIL reads them one by one in Python (3M one-byte comments: 4.4 s of a decode worker)."""
    flags = data[10] if len(data) > 10 else 0
    offset = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)  # global colour table
    blocks, end = 0, len(data)
    while offset < end and data[offset] == 0x21:  # an extension: label, then sub-blocks
        offset += 2
        while offset < end and data[offset] != 0:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise InvalidImage(f"the GIF has more than {MAX_GIF_BLOCKS} blocks before its "
                                   "image")
            offset += 1 + data[offset]
        offset += 1  # the terminator


def _webp_orientation(data: bytes) -> int:
    """The orientation in an extended WebP's EXIF chunk (a RIFF walk, bounded)."""
    offset, end = 12, min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    for _ in range(MAX_WEBP_CHUNKS):
        if offset + 8 > end:
            return 1
        kind, length = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8],
                                                               "little")
        if kind == b"EXIF":
            return tiff_orientation(data[offset + 8:offset + 8 + length])
        offset += 8 + length + (length & 1)  # chunks are padded to an even length
    raise InvalidImage(f"the WebP has more than {MAX_WEBP_CHUNKS} chunks")


_BMP_INFO_HEADERS = (40, 52, 56, 64, 108, 124)  # the sizes whose header has a compression field
_BMP_RLE = (1, 2)  # BI_RLE8, BI_RLE4


def is_rle_bmp(data: bytes) -> bool:
    """Whether the data is a BMP whose pixels are run-length encoded (RLE8 or RLE4), as PIL
    tells them: by the compression field of an info header, whatever the bit depth."""
    if data[:2] != b"BM" or len(data) < 34:
        return False
    header_size, compression = struct.unpack_from("<I12xI", data, 14)
    return header_size in _BMP_INFO_HEADERS and compression in _BMP_RLE


def read_header(data: bytes) -> Header:
    """(width, height) read from the header of PNG, JPEG, GIF, BMP, WebP and TIFF files, without
    decoding pixels (None when the header is cut short), and the EXIF orientation of JPEG,
    PNG and WebP files. Raises InvalidImage where a bounded walk refuses the structure."""
    try:
        if data[:8] == PNG_SIGNATURE and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            return Header((int(width), int(height)), _png_walk(data))
        if data[:2] == b"\xff\xd8":
            size, orientation = _jpeg_header(data)
            return Header(size, orientation)
        if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
            width, height = struct.unpack("<HH", data[6:10])
            _gif_walk(data)
            return Header((int(width), int(height)))
        if data[:2] == b"BM" and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return Header((abs(width), abs(height)))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
            chunk = data[12:16]
            if chunk == b"VP8 ":
                width, height = struct.unpack("<HH", data[26:30])
                return Header((width & 0x3FFF, height & 0x3FFF))
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return Header(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
            if chunk == b"VP8X":
                return Header((int.from_bytes(data[24:27], "little") + 1,
                               int.from_bytes(data[27:30], "little") + 1),
                              _webp_orientation(data))
        if data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 8:
            _tiff_walk(data)
            return Header(_tiff_size(data))
    except struct.error:
        return Header(None)
    return Header(None)


def header_size(data: bytes) -> tuple[int, int] | None:
    """The stored (width, height) from the header, or None (see read_header; also where its
    walk refuses the structure)."""
    try:
        return read_header(data).size
    except InvalidImage:
        return None


@dataclass
class Decoded:
    image: UInt8Image  # (h, w, 3) BGR; smaller than the original when decoded at reduced scale
    width: int  # the original's size, in the frame of ``image`` (oriented or as stored)
    height: int


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2))


def _reduction(data: bytes, size: tuple[int, int] | None, min_side: int | None) -> tuple[int, int]:
    """(factor, imread flag): the largest JPEG DCT scaling that keeps both sides >= min_side.

    libjpeg-turbo decodes 1/2, 1/4 or 1/8 of a JPEG's resolution for a fraction of the work;
    never below the model's input, so the resize still only shrinks.
    """
    if min_side is None or size is None or data[:2] != b"\xff\xd8":
        return 1, cv2.IMREAD_COLOR
    for factor, flag in _REDUCED:
        if min(size) // factor >= min_side:
            return factor, flag
    return 1, cv2.IMREAD_COLOR


def check_header(data: bytes, max_pixels: int) -> Header:
    """Everything that can be refused before a decoder runs: the format (``check_format``),
    the structure (bounded walks; a JPEG whose frame header cannot be found), the pixel count
    and sides the header declares. Returns what the header said."""
    if not data:
        raise InvalidImage("the image is empty (zero bytes)")
    check_format(data)
    header = read_header(data)
    size = header.size
    if size is None and data[:2] == b"\xff\xd8":
        raise InvalidImage("the JPEG has no readable frame header before its image data")
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLarge(f"the image has {size[0]}x{size[1]} pixels; the limit is "
                            f"{max_pixels} pixels")
    if size is not None and max(size) > MAX_SIDE:
        raise ImageTooLarge(f"the image is {size[0]}x{size[1]} pixels; no side may exceed "
                            f"{MAX_SIDE}")
    if size is not None and (size[0] == 0 or size[1] == 0):
        raise InvalidImage("the image header declares a zero width or height")
    return header


def decode(data: bytes, max_pixels: int, min_side: int | None = None,
           orientation: OrientationMode = "exif") -> Decoded:
    """Bytes -> BGR uint8 image, EXIF orientation applied (``exif``) or not (``stored``), and
    the original size in that frame.

    Only JPEG, PNG, GIF, BMP, WebP and TIFF reach the decoder (``check_format``). Grayscale,
    RGBA (alpha dropped), 16-bit and palette images become 8-bit BGR. The pixel count is
    checked from the header first, so a decompression bomb is refused before it is decoded.
    With ``min_side``, a large JPEG is decoded at a reduced scale whose sides stay >= min_side.
    OpenCV's own orientation handling is off: the header walk's orientation is applied, the
    same in both preprocessing modes.
    """
    header = check_header(data, max_pixels)
    size = header.size
    factor, flag = _reduction(data, size, min_side)
    try:
        image = cast(UInt8Image | None, cv2.imdecode(np.frombuffer(data, np.uint8),
                                                     flag | cv2.IMREAD_IGNORE_ORIENTATION))
    except cv2.error as exc:  # OpenCV's own checks on what a header declares
        raise InvalidImage() from exc
    if image is None or image.size == 0:
        raise InvalidImage()
    turn = header.orientation if orientation == "exif" else 1
    image = orient_array(image, turn)
    height, width = image.shape[:2]
    if factor > 1 and size is not None:
        width, height = oriented_size(size[0], size[1], turn)
    if width * height > max_pixels:  # formats whose header we do not read
        raise ImageTooLarge(f"the image has {width}x{height} pixels; the limit is "
                            f"{max_pixels} pixels")
    return Decoded(image, width, height)


def stretch_resize(image: UInt8Image, width: int, height: int) -> UInt8Image:
    """(height, width, 3), stretched without letterbox, its channels in the order given.

    The official pipeline resizes with PIL bilinear, which antialiases when it shrinks; OpenCV's
    INTER_AREA is the closest match when shrinking, INTER_LINEAR when enlarging.
    """
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if w * h > width * height else cv2.INTER_LINEAR
    return cast(UInt8Image, cv2.resize(image, (width, height), interpolation=interpolation))


def letterbox(image: UInt8Image, width: int, height: int) -> tuple[UInt8Image, Letterbox]:
    """``image`` scaled to fit (width, height) and centred on LETTERBOX_FILL grey, its channels
    in the order given."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    inner = stretch_resize(image, new_w, new_h)
    canvas = np.full((height, width, 3), LETTERBOX_FILL, np.uint8)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = inner
    return canvas, Letterbox(scale, float(pad_x), float(pad_y))


def to_chw_float(image: UInt8Image, mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None,
                 out: npt.NDArray[np.float32] | None = None,
                 bgr: bool = False) -> npt.NDArray[np.float32]:
    """(H, W, 3) uint8 RGB (or BGR: ``bgr``) -> (3, H, W) float32 RGB in [0, 1], then
    (x - mean) / std when given; written into ``out`` (a shared-memory slot) when given, else
    into a new array.

    Each plane is looked up in a table of its channel's 256 values (``channel_tables``), one
    pass a plane, where the arithmetic took four passes over the whole tensor: the same bits."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"three channels expected, not an image of shape {image.shape}")
    height, width = image.shape[:2]
    chw = np.empty((3, height, width), np.float32) if out is None else out
    if chw.shape != (3, height, width) or not chw.flags.c_contiguous:
        raise ValueError(f"cannot write a {width}x{height} image into {chw.shape}")
    planes = cv2.split(image)
    for plane, table, into in zip(planes[::-1] if bgr else planes, channel_tables(mean, std),
                                  chw):
        cv2.LUT(plane, table, dst=into)
    return chw


@lru_cache(maxsize=32)
def channel_tables(mean: tuple[float, float, float] | None = None,
                   std: tuple[float, float, float] | None = None
                   ) -> tuple[npt.NDArray[np.float32], ...]:
    """Each channel's 256 values as the model gets them, computed as torchvision does: divided
    by 255 (not multiplied by 1/255: the two differ in the last bit for some values), then
    ``(x - mean) / std`` in float32, the same operations in the same order."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    tables = ((values,) * 3 if mean is None or std is None else
              tuple((values - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)))
    for table in tables:
        table.flags.writeable = False  # shared by every request (lru_cache)
    return tables


def prepare(image_bgr: UInt8Image, input_width: int, input_height: int, resize: str = "stretch",
            mean: tuple[float, float, float] | None = None,
            std: tuple[float, float, float] | None = None,
            original_size: tuple[int, int] | None = None,
            out: npt.NDArray[np.float32] | None = None) -> PreparedImage:
    """Model-ready pixels. ``original_size`` (w, h) is the image's size before a reduced-scale
    decode (stretch only: the model scales its boxes to that size)."""
    height, width = image_bgr.shape[:2]
    if resize == "letterbox":
        canvas, box = letterbox(image_bgr, input_width, input_height)
        return PreparedImage(to_chw_float(canvas, mean, std, out, bgr=True), width, height,
                             (input_width, input_height), box)
    if original_size is not None:
        width, height = original_size
    resized = stretch_resize(image_bgr, input_width, input_height)
    return PreparedImage(to_chw_float(resized, mean, std, out, bgr=True), width, height,
                         (width, height))
