"""Reading uploads: a raw image body or multipart parts, refused while streaming when too big."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import InvalidRequest, PayloadTooLarge, ReadTimeout, UnsupportedMediaType

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the image bytes
RAW_TYPES = ("image/", "application/octet-stream")


async def _limited(request: Request, limit: int, read_timeout_s: float
                   ) -> AsyncGenerator[bytes, None]:
    """The body's chunks, stopping with PayloadTooLarge as soon as ``limit`` is passed (the rest
    is never read, so a huge upload costs no memory), or with ReadTimeout when the next chunk
    takes longer than ``read_timeout_s`` (slowloris-style uploads)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit} bytes")
    total = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(read_timeout_s):  # unlike wait_for, no task per chunk
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ReadTimeout(f"no data for {read_timeout_s:g} s") from None
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        yield chunk


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _multipart_images(request: Request, field: str, limit: int, max_parts: int,
                            part_limit: int, read_timeout_s: float) -> list[bytes]:
    parser = MultiPartParser(request.headers, _limited(request, limit, read_timeout_s),
                             max_files=max_parts, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"malformed multipart body: {exc.message}") from exc
    try:
        parts = form.getlist(field)
        if not parts:
            raise InvalidRequest(f"the multipart body has no '{field}' file part")
        images = []
        for part in parts:
            if not isinstance(part, UploadFile):
                raise InvalidRequest(f"the '{field}' part must be a file, not a text field")
            data = await part.read()
            if len(data) > part_limit:
                raise PayloadTooLarge(f"a part is over the limit of {part_limit} bytes")
            images.append(data)
        return images
    finally:
        await form.close()


async def read_image(request: Request, limit: int, read_timeout_s: float) -> bytes:
    """The one image of a /detect request: multipart part ``image``, or the raw body."""
    media = _media_type(request)
    if media == "multipart/form-data":
        images = await _multipart_images(request, "image", limit + MULTIPART_OVERHEAD_BYTES,
                                         max_parts=2, part_limit=limit,
                                         read_timeout_s=read_timeout_s)
        if len(images) != 1:
            raise InvalidRequest("send exactly one 'image' part")
        return images[0]
    if media.startswith(RAW_TYPES):
        return b"".join([chunk async for chunk in _limited(request, limit, read_timeout_s)])
    raise UnsupportedMediaType()


async def read_images(request: Request, limit: int, max_images: int, read_timeout_s: float
                      ) -> list[bytes]:
    """The images of a /detect/batch request: multipart parts ``images``, in order."""
    if _media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with one or more 'images' parts")
    images = await _multipart_images(
        request, "images", max_images * limit + MULTIPART_OVERHEAD_BYTES,
        max_parts=max_images + 1, part_limit=limit, read_timeout_s=read_timeout_s)
    if len(images) > max_images:
        raise InvalidRequest(f"at most {max_images} images per batch request")
    return images
