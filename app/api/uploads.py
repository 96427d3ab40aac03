"""Reading uploads: a raw image body or multipart parts, refused while streaming when too big.

Multipart bodies are parsed as they arrive, on the event loop, by ``multipart``'s push parser:
it finds each boundary with ``bytes.find`` (C speed, linear) and refuses a delimiter that is
followed by anything but CRLF or ``--`` (RFC 2046: the delimiter may not occur in a part), where
python-multipart stepped byte by byte through each one (16 MiB of ``\r\n--ax`` with boundary
``a``: 2-4 s of CPU on the loop). A normal body costs a few ``find`` calls per 64 KiB chunk."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from fastapi import Request
from multipart import (  # type: ignore[import-untyped]
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
)
from starlette.requests import ClientDisconnect

from app.config import Settings
from app.errors import (
    ClientClosed,
    InvalidRequest,
    PayloadTooLarge,
    ReadTimeout,
    UnsupportedMediaType,
)

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the image bytes
MAX_TEXT_FIELDS = 8  # text parts besides the files; each is read and dropped
MAX_BOUNDARY_CHARS = 70  # RFC 2046
MAX_PART_HEADER_BYTES = 4096 + 128  # one header line of a part
MAX_PART_HEADERS = 8  # header lines of a part (RFC 7578 uses 3)
JSON_OVERHEAD_BYTES = 4 * 1024  # the JSON around the base64 text, a data: URL prefix
RAW_TYPES = ("image/", "application/octet-stream")


class _UploadClock:
    """READ_TIMEOUT_S between chunks and UPLOAD_TIMEOUT_S in all, on one timer per upload that
    cancels the reading task only while it waits for a chunk. (``asyncio.timeout_at`` around
    each chunk cost more of the event loop than the rest of reading a small upload.)"""

    def __init__(self, read_timeout_s: float, upload_timeout_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.cancelling = task, task.cancelling()
        self.loop = loop = asyncio.get_running_loop()
        self.read_timeout_s, self.upload_timeout_s = read_timeout_s, upload_timeout_s
        self.deadline = loop.time() + upload_timeout_s
        self.waiting_since: float | None = None  # while a chunk is awaited
        self.expired = ""  # why it cancelled the task
        self.timer: asyncio.TimerHandle | None = None  # None between chunks once it has fired

    def wait_starts(self) -> None:
        self.waiting_since = now = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(min(self.deadline, now + self.read_timeout_s),
                                           self._check)

    def _check(self) -> None:
        if self.waiting_since is None:  # between chunks: the next wait arms it again
            self.timer = None
            return
        due = min(self.deadline, self.waiting_since + self.read_timeout_s)
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._check)
            return
        self.expired = (f"the upload took longer than {self.upload_timeout_s:g} s"
                        if due == self.deadline else f"no data for {self.read_timeout_s:g} s")
        self.timer = None
        self.task.cancel()

    def chunk_arrived(self) -> None:
        self.waiting_since = None
        if self.expired:  # its cancel came as the chunk did, and was swallowed on the way
            self.task.uncancel()  # (asyncio.wait_for in 3.11 may): taken back, the upload
            self.expired = ""  # goes on, as asyncio.timeout lets it

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def timed_out(self) -> bool:
        """After a CancelledError while waiting: whether this clock's cancel it was (and only
        it), now taken back."""
        return bool(self.expired) and self.task.uncancel() <= self.cancelling


async def _limited(request: Request, limit: int, settings: Settings
                   ) -> AsyncGenerator[bytes, None]:
    """The body's chunks, stopping with PayloadTooLarge as soon as ``limit`` is passed (the rest
    is never read, so a huge upload costs no memory), or with ReadTimeout when the next chunk
    takes longer than READ_TIMEOUT_S or the whole body longer than UPLOAD_TIMEOUT_S
    (slowloris-style uploads: a byte every few seconds resets no deadline)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes")
    total = 0
    chunks = request.stream().__aiter__()
    clock = _UploadClock(settings.read_timeout_s, settings.upload_timeout_s)
    try:
        while True:
            clock.wait_starts()
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except ClientDisconnect:  # gone mid-upload: a 499 in the metrics, no traceback
                raise ClientClosed() from None
            except asyncio.CancelledError:
                if clock.timed_out():
                    raise ReadTimeout(clock.expired) from None
                raise
            clock.chunk_arrived()
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
            yield chunk
    finally:
        clock.stop()


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class _FileParts:
    """The file parts named ``field``, in the order sent, from a multipart parser's events;
    other parts are counted (at most ``max_files`` files, MAX_TEXT_FIELDS text fields) and
    their bytes dropped as they arrive."""

    def __init__(self, field: str, max_files: int, max_part_bytes: int) -> None:
        self.field, self.max_files, self.max_part_bytes = field, max_files, max_part_bytes
        self.images: list[bytes] = []
        self._files = self._fields = self._size = 0
        self._chunks: list[bytes] | None = None  # the kept part being read

    def on_event(self, event: MultipartSegment | bytes | None) -> None:
        if isinstance(event, MultipartSegment):
            self._start(event)
        elif event is None:  # the end of a part
            if self._chunks is not None:
                self.images.append(b"".join(self._chunks))
            self._chunks = None
        elif self._chunks is not None:
            self._size += len(event)
            if self._size > self.max_part_bytes:
                raise PayloadTooLarge(f"a part is over the limit of {self.max_part_bytes} "
                                      "bytes")
            self._chunks.append(event)

    def _start(self, segment: MultipartSegment) -> None:
        is_file = segment.filename is not None
        if is_file:
            self._files += 1
            if self._files > self.max_files:
                raise InvalidRequest("malformed multipart body: too many files; at most "
                                     f"{self.max_files}")
        else:
            self._fields += 1
            if self._fields > MAX_TEXT_FIELDS:
                raise InvalidRequest("malformed multipart body: too many text fields; at "
                                     f"most {MAX_TEXT_FIELDS}")
        if segment.name == self.field and not is_file:
            raise InvalidRequest(f"the '{self.field}' part must be a file, not a text field")
        self._chunks = [] if segment.name == self.field else None
        self._size = 0


# The boundary parameter, quoted or not: read here rather than by a generic header parser,
# which stops an unquoted one at its first "=" (boundary=----=_Part_0_1.2, as some mail-born
# encoders write it; python-multipart took the whole value).
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]*)"|([^;\s]*))', re.IGNORECASE)


def _boundary(request: Request) -> str:
    found = _BOUNDARY.search(request.headers.get("content-type", ""))
    boundary = "" if found is None else found.group(1) or found.group(2) or ""
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        raise InvalidRequest("malformed multipart body: the Content-Type needs a boundary of "
                             f"1 to {MAX_BOUNDARY_CHARS} characters")
    return str(boundary)


async def _multipart_images(request: Request, field: str, limit: int, max_parts: int,
                            settings: Settings) -> list[bytes]:
    """The file parts named ``field`` of a multipart body of at most ``limit`` bytes, parsed
    chunk by chunk as it arrives (each part refused as soon as it passes MAX_UPLOAD_BYTES)."""
    parts = _FileParts(field, max_parts, settings.max_upload_bytes)
    try:
        parser = PushMultipartParser(
            _boundary(request), max_header_size=MAX_PART_HEADER_BYTES,
            max_header_count=MAX_PART_HEADERS, max_segment_count=max_parts + MAX_TEXT_FIELDS,
            header_charset="latin-1")  # any byte decodes: a file name may be in any charset
        async for chunk in _limited(request, limit, settings):
            if chunk:  # an empty chunk would close the parser
                for event in parser.parse(chunk):
                    parts.on_event(event)
        parser.close()  # refuses a body that ended before its closing boundary
    except MultipartError as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    if not parts.images:
        raise InvalidRequest(f"the multipart body has no '{field}' file part")
    return parts.images


def _from_json(body: bytes, limit: int) -> bytes:
    """The image of a ``{"image": "<base64>"}`` body (a data: URL prefix is accepted), and
    nothing else: any other field is refused by counting bytes, before parsing (orjson holds
    the GIL while it parses, so a body of a million list items would stall every request)."""
    if body.count(b"[") + body.count(b"{") > 1 or body.count(b",") > 1:
        raise InvalidRequest('send {"image": "<base64 of the image file>"} and no other field')
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    text = document.get("image") if isinstance(document, dict) else None
    if not isinstance(text, str) or len(document) != 1:
        raise InvalidRequest('send {"image": "<base64 of the image file>"} and no other field')
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("image: not valid base64") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {limit} bytes")
    return data


async def read_image(request: Request, settings: Settings) -> bytes:
    """The one image of a /detect request: multipart part ``image``, the raw body, or JSON
    ``{"image": "<base64>"}`` (the same byte limit applies to the decoded image)."""
    media = _media_type(request)
    limit = settings.max_upload_bytes
    if media == "multipart/form-data":
        images = await _multipart_images(request, "image", limit + MULTIPART_OVERHEAD_BYTES,
                                         max_parts=2, settings=settings)
        if len(images) != 1:
            raise InvalidRequest("send exactly one 'image' part")
        return images[0]
    if media.startswith(RAW_TYPES):
        return b"".join([chunk async for chunk in _limited(request, limit, settings)])
    if media == "application/json":
        encoded_limit = limit * 4 // 3 + JSON_OVERHEAD_BYTES  # base64 is 4 bytes per 3
        body = b"".join([chunk async for chunk in _limited(request, encoded_limit, settings)])
        return await asyncio.to_thread(_from_json, body, limit)  # base64 of 16 MiB: ~20 ms
    raise UnsupportedMediaType()


async def read_images(request: Request, settings: Settings) -> list[bytes]:
    """The images of a /detect/batch request: multipart parts ``images``, in order."""
    if _media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with one or more 'images' parts")
    max_images = settings.max_batch_images
    images = await _multipart_images(
        request, "images", max_images * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        max_parts=max_images + 1, settings=settings)
    if len(images) > max_images:
        raise InvalidRequest(f"at most {max_images} images per batch request")
    return images


async def read_body(request: Request, settings: Settings, limit: int) -> bytearray:
    """A whole body of at most ``limit`` bytes, under the same deadlines as an upload, held
    once: chunks go into one buffer as they arrive (a list of chunks joined at the end would
    hold the body twice). Not sized by Content-Length up front: a client could declare a
    large body and send none of it."""
    body = bytearray()
    async for chunk in _limited(request, limit, settings):
        body += chunk
    return body


async def read_json_object(request: Request, settings: Settings, limit: int
                           ) -> dict[str, Any]:
    """An optional JSON object body of at most ``limit`` bytes (a control call's): ``{}`` for
    an empty body, InvalidRequest for anything but an object."""
    data = await read_body(request, settings, limit)
    if not data.strip():
        return {}
    try:
        body = orjson.loads(bytes(data))
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body

