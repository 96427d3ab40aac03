"""The MJPEG parser's bounds and the handoff between a reader thread and its stream
(app.streams.sources, app.streams.stream)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from app.streams.sources import Frame, SourceError, _mjpeg_parts
from app.streams.stream import Handoff, _End


class Body:
    """A body read in small pieces, as a socket gives it (a fake: the parser's input)."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.data, self.piece = data, piece
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.data[:min(size, self.piece)]
        self.data = self.data[len(chunk):]
        self.read_bytes += len(chunk)
        return chunk


def part(data: bytes, length: bool = True) -> bytes:
    head = b"--frame\r\nContent-Type: image/jpeg\r\n"
    if length:
        head += b"Content-Length: " + str(len(data)).encode() + b"\r\n"
    return head + b"\r\n" + data + b"\r\n"


@pytest.mark.parametrize("length", [True, False])
def test_parts_come_whole_with_or_without_their_length(length: bool) -> None:
    jpegs = [b"\xff\xd8one\xff\xd9", b"\xff\xd8two\r\n--not-the-boundary\xff\xd9", b"\xff\xd8"]
    # Without a length a part ends where the next boundary starts: the last one's follows it.
    body = Body(b"".join(part(j, length) for j in jpegs) + b"--frame--\r\n")
    parts = _mjpeg_parts(body, b"frame", 1000)  # type: ignore[arg-type]
    got = [next(parts) for _ in jpegs]
    assert got == jpegs
    with pytest.raises(SourceError, match="ended"):
        next(parts)


def test_a_part_announcing_more_than_the_limit_is_refused_before_it_is_read() -> None:
    body = Body(b"--frame\r\nContent-Length: 2000000000\r\n\r\n" + b"x" * 10_000, piece=4096)
    with pytest.raises(SourceError, match="2000000000 bytes"):
        next(_mjpeg_parts(body, b"frame", 1000))  # type: ignore[arg-type]
    assert body.read_bytes <= 4096


def test_a_part_without_a_boundary_costs_at_most_the_limit() -> None:
    body = Body(part(b"x" * 100, length=False)[:-2] + b"y" * 1_000_000, piece=512)
    with pytest.raises(SourceError, match="over 1000 bytes"):
        next(_mjpeg_parts(body, b"frame", 1000))  # type: ignore[arg-type]
    assert body.read_bytes < 3000


@pytest.mark.parametrize("data", [b"x" * 100_000, b"\r\n" * 50_000,
                                  b"--frame\r\n" + b"X-A: b\r\n" * 10_000])
def test_endless_headers_and_garbage_are_refused_within_a_bound(data: bytes) -> None:
    body = Body(data, piece=1024)
    with pytest.raises(SourceError):
        next(_mjpeg_parts(body, b"frame", 1000))  # type: ignore[arg-type]
    assert body.read_bytes < 20_000


def frame(index: int) -> Frame:
    return Frame(index, None, 0.0, 1, 1, jpeg=b"x")


def test_a_live_handoff_keeps_the_newest_frame_and_gives_back_the_one_replaced() -> None:
    async def scenario() -> list[Any]:
        handoff = Handoff(asyncio.get_running_loop())
        assert handoff.put(frame(0), wait=False) is None
        replaced = handoff.put(frame(1), wait=False)
        handoff.end(None)
        taken = await handoff.get()
        end = await handoff.get()
        return [replaced, taken, end]

    replaced, taken, end = asyncio.run(scenario())
    assert replaced.index == 0 and taken.index == 1 and isinstance(end, _End)


def test_a_file_handoff_makes_the_reader_wait_until_its_frame_is_taken() -> None:
    async def scenario() -> list[int]:
        handoff = Handoff(asyncio.get_running_loop())
        reader_done = threading.Event()

        def reader() -> None:
            for k in range(5):
                assert handoff.put(frame(k), wait=True) is None
            handoff.end(None)
            reader_done.set()

        threading.Thread(target=reader, daemon=True).start()
        got = []
        while not isinstance(item := await handoff.get(), _End):
            got.append(item.index)
        assert await asyncio.to_thread(reader_done.wait, 10)
        return got

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_a_closed_handoff_lets_a_waiting_reader_go() -> None:
    async def scenario() -> Any:
        handoff = Handoff(asyncio.get_running_loop())
        handoff.put(frame(0), wait=True)
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(handoff.put(frame(1), wait=True)))
        thread.start()
        handoff.close()
        await asyncio.to_thread(thread.join, 10)
        return result

    assert asyncio.run(scenario()) == [False]


def test_a_service_without_streams_loads_no_video_library() -> None:
    """PyAV and the tracker's libraries come with a stream's first frame: a service that
    watches no video (and the GPU check's kit, which carries neither) never imports them."""
    import subprocess
    import sys

    code = ("import sys, app.main, app.cli, app.api.stream_routes; "
            "print(sorted(m for m in ('av', 'supervision', 'trackers', 'scipy') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "[]"
