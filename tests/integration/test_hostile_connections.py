"""Hostile clients, round 3, at the connection: refusals sent before the body is read must
reach the client (not a reset), and a client that reads slowly must not keep a render place
for longer than the send deadline. Real server, real clients (httpx's pool, raw sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest

from app.bench.stats import metric_value
from tests.helpers import Server, encode, render_scene, run_server

KEY = "round-three-key"
AUTH = {"X-API-Key": KEY}
GOOD = encode(render_scene(5)[0])
UPLOAD_LIMIT = 2 * 1024 * 1024
LIMITS = {
    "--api-key": KEY, "--max-upload-bytes": str(UPLOAD_LIMIT), "--max-batch-images": "4",
    "--upload-timeout-s": "2",  # how long a refused body is read and dropped
    "--max-connections": "24", "--max-queue": "1", "--admission-wait-ms": "0",
    "--max-renders": "1", "--write-timeout-s": "5", "--min-send-rate": str(4 * 1024 * 1024),
}
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * UPLOAD_LIMIT  # MAX_BATCH_IMAGES x MAX_UPLOAD_BYTES
# Large enough that a client is still sending when the answer comes: before, most of these
# clients lost it to the reset (a 363 KB body lost it now and then, more often under load).
BODY = b"\xff\xd8" + b"\x01" * 3_000_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = [item for pair in LIMITS.items() for item in pair]
    with run_server(tmp_path_factory.mktemp("connections"), *args) as server:
        yield server


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def head_of(request: str, length: int) -> bytes:
    return (f"{request} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"X-API-Key: {KEY}\r\nContent-Length: {length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, timeout_s: float = 10) -> tuple[bytes, str]:
    """What the server sent, and how the connection ended: 'closed' (a FIN), 'reset' or
    'timeout'."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except TimeoutError:
        return data, "timeout"
    return data, "closed"


def post_from_pool(server: Server, path: str, body: bytes, headers: dict[str, str],
                   clients: int = 16, each: int = 3) -> tuple[list[httpx.Response], Counter[str]]:
    """``clients`` keep-alive connections of one httpx pool, each posting ``each`` times."""
    answers: list[httpx.Response] = []
    errors: Counter[str] = Counter()

    async def one(http: httpx.AsyncClient) -> None:
        for _ in range(each):
            try:
                answers.append(await http.post(f"{server.url}{path}", content=body,
                                               headers={"Content-Type": "image/jpeg", **headers}))
            except httpx.TransportError as exc:
                errors[type(exc).__name__] += 1

    async def pool() -> None:
        async with httpx.AsyncClient(timeout=30,
                                     limits=httpx.Limits(max_connections=clients)) as http:
            await asyncio.gather(*(one(http) for _ in range(clients)))

    asyncio.run(pool())
    return answers, errors


def dropped_connections(server: Server) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    return metric_value(metrics, 'dfine_errors_total{code="client_closed"}')


def noisy_jpeg(size: int, quality: int) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/nowhere", AUTH, 404), ("/detect", {}, 401), ("/detect", AUTH, 413)])
def test_refusals_before_the_body_reach_every_keep_alive_client(
        served: Server, path: str, headers: dict[str, str], status: int) -> None:
    answers, errors = post_from_pool(served, path, BODY, headers)
    assert not errors, errors  # before: ReadError for most of them
    assert len(answers) == 48 and {a.status_code for a in answers} == {status}
    assert all(a.headers.get("connection") == "close" for a in answers)
    # A request whose body was read is still kept alive.
    with httpx.Client(timeout=10) as http:
        good = http.post(f"{served.url}/detect", content=GOOD,
                         headers={"Content-Type": "image/jpeg", **AUTH})
        assert good.status_code == 200 and "connection" not in good.headers


def test_a_503_at_admission_reaches_every_client_with_its_retry_after(served: Server) -> None:
    # MAX_QUEUE 1 and no admission wait: most of 16 clients at once are refused at the door,
    # before their 1.9 MB bodies are read (the case of the issue: 18-23 % ReadError before).
    image = noisy_jpeg(1400, 85)
    assert 1_000_000 < len(image) < UPLOAD_LIMIT
    answers, errors = post_from_pool(served, "/detect", image, AUTH, each=2)
    assert not errors, errors
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {200, 503} and statuses[503] >= 8, statuses
    refused = [a for a in answers if a.status_code == 503]
    assert all(a.headers.get("retry-after") == "1" and a.headers.get("connection") == "close"
               for a in refused)


def test_raw_clients_read_the_refusal_then_a_clean_close(served: Server) -> None:
    # ~360 KB bodies, as in the issue: the unread part sat in the server's socket when it
    # closed, and every one of these ended in a reset (the answer sometimes lost with it).
    for _ in range(16):
        with socket.create_connection(address(served), timeout=10) as sock:
            sock.sendall(head_of("POST /nowhere", 363_000) + b"\x01" * 363_000)
            data, end = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 404") and b"connection: close\r\n" in data
        assert end == "closed"


def test_a_refused_body_is_read_for_a_bounded_time_and_size(served: Server) -> None:
    # Time: a client that drips the rest of its body after its answer is cut off after
    # UPLOAD_TIMEOUT_S (2 s here), not held for ever.
    with socket.create_connection(address(served), timeout=10) as sock:
        sock.sendall(head_of("POST /nowhere", 50_000_000) + b"\x01")
        sock.settimeout(5)
        answer = sock.recv(65536)
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < 10:
                sock.sendall(b"\x01")
                time.sleep(0.05)
        cut_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 404") and b"connection: close\r\n" in answer
    assert LINGER_S - 0.5 < cut_after < LINGER_S + 3, cut_after
    # Size: one that sends as fast as it can is cut off after LINGER_MAX_BYTES.
    sent = 0
    with socket.create_connection(address(served), timeout=10) as sock:
        sock.sendall(head_of("POST /nowhere", 200_000_000))
        chunk = b"\x01" * 1_048_576
        with contextlib.suppress(OSError):
            while sent < 200_000_000:
                sock.sendall(chunk)
                sent += len(chunk)
        answer, _ = read_until_closed(sock)
    assert sent < LINGER_MAX_BYTES + 40_000_000, sent  # cut long before 200 MB (the rest:
    # what the socket buffers took)
    assert answer.startswith(b"HTTP/1.1 404") and b"connection: close\r\n" in answer


def test_lingering_connections_count_toward_max_connections(served: Server) -> None:
    lingering = []
    try:
        for _ in range(24):  # MAX_CONNECTIONS
            sock = socket.create_connection(address(served), timeout=5)
            sock.sendall(head_of("POST /nowhere", 1_000_000) + b"\x01" * 1000)
            assert sock.recv(65536).startswith(b"HTTP/1.1 404")
            lingering.append(sock)
        with socket.create_connection(address(served), timeout=5) as extra:
            data, _ = read_until_closed(extra, timeout_s=2)
        assert data.startswith(b"HTTP/1.1 503") and b"too many connections" in data
        # Past UPLOAD_TIMEOUT_S they are closed, and the service answers again.
        deadline = time.monotonic() + LINGER_S + 5
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{served.url}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the lingering connections were not closed"
            time.sleep(0.1)
    finally:
        for sock in lingering:
            sock.close()


def test_a_slow_reader_gives_its_render_place_back_by_the_send_deadline(served: Server
                                                                        ) -> None:
    """A client reading a 12 MB PNG at 400 KB/s (never stalled for WRITE_TIMEOUT_S) held the
    one render place for 30 s; with WRITE_TIMEOUT_S 5 s and MIN_SEND_RATE 4 MiB/s its
    response must be sent within 5 + 3 s of its start."""
    upload = noisy_jpeg(2000, 20)  # 0.8 MB to send, a 12 MB PNG once drawn
    dropped_before = dropped_connections(served)
    started, done = threading.Event(), threading.Event()

    def read_slowly(rate: float = 400_000) -> None:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(30)
            sock.connect(address(served))
            sock.sendall(head_of("POST /detect/render?format=png", len(upload)) + upload)
            with contextlib.suppress(OSError):
                total, began = 0, time.monotonic()
                while not done.is_set() and (chunk := sock.recv(4096)):
                    if total == 0 and chunk.startswith(b"HTTP/1.1 200"):
                        started.set()
                    total += len(chunk)
                    while total > rate * (time.monotonic() - began):
                        time.sleep(0.005)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        assert started.wait(30), "the render never started"
        began = time.monotonic()
        statuses = []
        while True:
            response = httpx.post(f"{served.url}/detect/render", content=GOOD, timeout=10,
                                  headers={"Content-Type": "image/jpeg", **AUTH})
            statuses.append(response.status_code)
            waited = time.monotonic() - began
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            assert waited < 14, "the render place was not given back"
            time.sleep(0.2)
    finally:
        done.set()
        reader.join(30)
    # The slow reader held the place, until its deadline (8 s) rather than its end (30 s).
    assert statuses[0] == 503 and waited < 14, (statuses, waited)
    deadline = time.monotonic() + 5
    while dropped_connections(served) <= dropped_before:
        assert time.monotonic() < deadline, "the dropped reader was not counted"
        time.sleep(0.1)
