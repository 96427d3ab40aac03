"""Hostile inputs, round 3 (issue 25, items 5 and 6), on a real server in exact mode (PIL
decodes) with one decode worker, so that a worker held by an attack shows at once: multipart
bodies of false boundaries, TIFFs of millions of strips or fractions, RLE BMPs PIL decodes a
pixel at a time, JPEGs of a million Photoshop resources. Each is refused at once, /healthz
keeps answering within 1 s while they run, and a normal /detect sent meanwhile is answered
within 5 s; well-formed TIFF, BMP and RLE8 BMP files still give their PNG's detections."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest
from PIL import Image

from tests.helpers import Server, assert_same_detections, encode, render_scene, run_server
from tests.unit.test_decode_bounds import (
    RATIONAL,
    SHORT,
    bmp_rle,
    boundary_flood,
    entry,
    jpeg_with_photoshop_resources,
    rle8_bmp_of,
    rle_runs,
    strip_tiff,
    tiff_with_strips,
)

SCENE = render_scene(5)[0]
GOOD = encode(SCENE)
FLOOD_TYPE = "multipart/form-data; boundary=a"


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("round3"), "--decode-workers", "1") as server:
        yield server


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


def received(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the server closed the connection without an answer"
    return chunk


def post(server: Server, data: bytes, content_type: str = "application/octet-stream"
         ) -> Answer:
    """POST /detect from a raw socket: the whole request in one ``sendall`` (C, without the
    GIL: 16 clients in threads of this process leave its /healthz probe its timing), then the
    answer read to its Content-Length (a half-close would be a client gone)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        response = b""
        while b"\r\n\r\n" not in response:
            response += received(sock)
        head, _, body = response.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length is not None, head
        while len(body) < int(length[1]):
            body += received(sock)
    return Answer(int(head.split(b" ", 2)[1]), json.loads(body))


def server_cpu_s(server: Server) -> float:
    """User and system CPU time the server process has used so far."""
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Siege:
    """What happened while attacks ran: their answers and times, the normal /detect sent once
    every attack had started, and the slowest /healthz from the first attack to the last."""

    answers: list[Answer] = field(default_factory=list)
    took_s: list[float] = field(default_factory=list)
    detect_s: float = 0.0
    slowest_health_s: float = 0.0


def besiege(server: Server, attacks: list[Callable[[], Answer]]) -> Siege:
    siege, done = Siege(), threading.Event()
    started = [threading.Event() for _ in attacks]

    def probe() -> None:
        while not done.is_set():
            begun = time.perf_counter()
            httpx.get(f"{server.url}/healthz", timeout=30)
            siege.slowest_health_s = max(siege.slowest_health_s, time.perf_counter() - begun)
            time.sleep(0.02)

    def attack(k: int) -> None:
        started[k].set()
        begun = time.perf_counter()
        siege.answers.append(attacks[k]())
        siege.took_s.append(time.perf_counter() - begun)

    prober = threading.Thread(target=probe)
    threads = [threading.Thread(target=attack, args=(k,)) for k in range(len(attacks))]
    prober.start()
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(30)
    begun = time.perf_counter()
    normal = httpx.post(f"{server.url}/detect", files={"image": ("a.jpg", GOOD, "image/jpeg")},
                        timeout=60)
    siege.detect_s = time.perf_counter() - begun
    assert normal.status_code == 200 and normal.json()["detections"], normal.text
    for thread in threads:
        thread.join()
    done.set()
    prober.join()
    return siege


def assert_refused(answer: Answer, status: int, code: str, words: str) -> None:
    assert answer.status == status, answer
    error = answer.body["error"]
    assert error["code"] == code and words in error["message"], error


def test_a_multipart_boundary_flood_costs_the_server_little_cpu(exact: Server) -> None:
    """16 MiB of \\r\\n--ax with boundary a: 3.6-4.5 s of CPU on the event loop before."""
    body = boundary_flood(16 * 1024 * 1024)
    before = server_cpu_s(exact)
    answer = post(exact, body, FLOOD_TYPE)
    used = server_cpu_s(exact) - before
    assert used < 0.5, used
    assert_refused(answer, 422, "invalid_request", "malformed multipart body")


def test_floods_of_false_boundaries_leave_health_and_detect_answered(exact: Server) -> None:
    """16 clients x 6 MiB froze /healthz 2 s and held a normal /detect 3 s before."""
    body = boundary_flood(6 * 1024 * 1024)
    siege = besiege(exact, [lambda: post(exact, body, FLOOD_TYPE)] * 16)
    assert siege.slowest_health_s < 1.0, siege
    assert siege.detect_s < 5.0, siege
    for answer in siege.answers:
        assert_refused(answer, 422, "invalid_request", "malformed multipart body")


def test_tiffs_of_millions_of_strips_are_refused_without_holding_a_worker(exact: Server
                                                                          ) -> None:
    """A 1x2 TIFF with 1.86M strip offsets (16 MiB) held a decode worker 15 s and got 200;
    two of them blocked both workers 29 s."""
    tiff = tiff_with_strips(1_860_000)
    siege = besiege(exact, [lambda: post(exact, tiff, "image/tiff")] * 2)
    assert max(siege.took_s) < 3.0, siege
    assert siege.slowest_health_s < 1.0 and siege.detect_s < 5.0, siege
    for answer in siege.answers:
        assert_refused(answer, 400, "invalid_image", "1860000 strips")


def test_rle4_bmps_of_25_megapixels_are_refused_without_holding_a_worker(exact: Server
                                                                         ) -> None:
    """210 KB each, 3.2 s of PIL's Python RLE decoder; eight held a normal /detect 22 s."""
    bmp = bmp_rle(5000, 5000, rle_runs(5000, 5000), bits=4)
    assert len(bmp) < 250_000
    siege = besiege(exact, [lambda: post(exact, bmp, "image/bmp")] * 8)
    assert siege.slowest_health_s < 1.0 and siege.detect_s < 5.0, siege
    for answer in siege.answers:
        assert_refused(answer, 413, "image_too_large", "5000x5000")


def tiff_of_fractions() -> bytes:  # 4.6 s of PIL before, then 200
    return strip_tiff(1, 1, [entry(282, RATIONAL, [72, 1] * 1_900_000),
                             entry(283, RATIONAL, [72, 1])])


def exif_of_fractions() -> bytes:  # 3.9 s of PIL before, then 200
    return strip_tiff(1, 1, exif=[entry(41486, RATIONAL, [1, 1] * 1_900_000)])


def directory_of_entries() -> bytes:  # 0.45 s of PIL, then 400 for another reason
    return strip_tiff(1, 1, [entry(40000 + k, SHORT, [1]) for k in range(25_000)])


def rle8_of_one_pixel_runs() -> bytes:  # 16 MiB, 3.3 s of PIL before
    return bmp_rle(4000, 2000, b"\x01\x07" * 8_000_000)


def jpeg_of_photoshop_resources() -> bytes:  # 1.4M resources in 16 MiB: 1 s of PIL, then 200
    return jpeg_with_photoshop_resources(GOOD, 1_390_000, per_segment=5455)


OTHER_LOOPS: dict[str, tuple[Callable[[], bytes], int, str, str]] = {
    "tiff of 1.9M fractions": (tiff_of_fractions, 400, "invalid_image", "fractions"),
    "tiff exif of 1.9M fractions": (exif_of_fractions, 400, "invalid_image", "fractions"),
    "tiff directory of 25,000 entries": (directory_of_entries, 400, "invalid_image",
                                         "entries"),
    "rle8 bmp of 8M one-pixel runs": (rle8_of_one_pixel_runs, 413, "image_too_large", "RLE"),
    "jpeg of 1.4M photoshop resources": (jpeg_of_photoshop_resources, 400, "invalid_image",
                                         "Photoshop"),
}


@pytest.mark.parametrize("case", list(OTHER_LOOPS))
def test_other_files_pil_would_loop_over_in_python_are_refused_at_once(exact: Server,
                                                                       case: str) -> None:
    make, status, code, words = OTHER_LOOPS[case]
    data = make()
    assert len(data) <= 16 * 1024 * 1024
    started = time.perf_counter()
    answer = post(exact, data)
    assert time.perf_counter() - started < 2.0
    assert_refused(answer, status, code, words)
    assert post(exact, GOOD).status == 200


def pil_bytes(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def detections(server: Server, data: bytes) -> list[dict[str, Any]]:
    answer = post(server, data)
    assert answer.status == 200, answer
    return list(answer.body["detections"])


def test_well_formed_tiff_bmp_and_rle8_bmp_files_give_their_pngs_detections(exact: Server
                                                                            ) -> None:
    """What the bounds must not refuse: files encoders write, one at a time and in a
    multipart batch (in order), answered as the same pixels in a PNG."""
    scene = Image.fromarray(cv2.cvtColor(SCENE, cv2.COLOR_BGR2RGB))
    quantized = scene.quantize(256)
    want = detections(exact, encode(SCENE, ".png"))
    want_quantized = detections(exact, pil_bytes(quantized.convert("RGB"), "PNG"))
    ok, opencv_tiff = cv2.imencode(".tiff", SCENE)
    assert ok and want and want_quantized
    files = {"tiff": pil_bytes(scene, "TIFF"),
             "lzw tiff": pil_bytes(scene, "TIFF", compression="tiff_lzw"),
             "opencv tiff": opencv_tiff.tobytes(), "bmp": pil_bytes(scene, "BMP"),
             "rle8 bmp": rle8_bmp_of(quantized)}
    expected = {name: want_quantized if name == "rle8 bmp" else want for name in files}
    for name, data in files.items():
        assert_same_detections(detections(exact, data), expected[name])
    parts = [("images", (f"{name}.img", data, "application/octet-stream"))
             for name, data in files.items()]
    batch = httpx.post(f"{exact.url}/detect/batch", files=parts, timeout=60)
    assert batch.status_code == 200, batch.text
    for result, name in zip(batch.json()["results"], files, strict=True):
        assert_same_detections(result["detections"], expected[name])
    single = httpx.post(f"{exact.url}/detect", timeout=60,
                        files={"image": ("a.tiff", files["tiff"], "image/tiff")})
    assert single.status_code == 200
    assert_same_detections(single.json()["detections"], want)
