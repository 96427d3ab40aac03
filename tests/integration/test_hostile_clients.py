"""Attacks on a real server over loopback, each bounded in time and sockets, each followed by
a good request that must be answered promptly. The server runs with small limits so that
every attack is reached within seconds; the mechanisms are those of the defaults."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from app.bench.stats import metric_value
from tests.helpers import Server, encode, render_scene, run_server, wait_for_metrics, wait_until
from tests.soak import rss_mb

GOOD = encode(render_scene(5)[0])
LIMITS = {"--header-timeout-s": "1", "--max-header-bytes": "16384", "--max-connections": "60",
          "--read-timeout-s": "5", "--upload-timeout-s": "4", "--upload-hold-ms": "300",
          "--max-slow-uploads": "8", "--write-timeout-s": "2", "--max-queue": "4",
          "--admission-wait-ms": "50", "--max-renders": "1"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = [item for pair in LIMITS.items() for item in pair]
    with run_server(tmp_path_factory.mktemp("hostile"), *args) as running:
        yield running


def served(url: str, within_s: float = 5.0) -> bool:
    """Whether a good request gets its 200 (not a 503) within ``within_s``."""
    response = httpx.post(f"{url}/detect", content=GOOD, timeout=within_s,
                          headers={"Content-Type": "image/jpeg"})
    assert response.status_code in (200, 503), response.text
    return response.status_code == 200


def good_request(url: str, within_s: float = 5.0) -> None:
    """A good request answered 200 within ``within_s`` (5 s: round 3's bound on how long a
    normal /detect may wait behind an attacker)."""
    started = time.perf_counter()
    response = httpx.post(f"{url}/detect", content=GOOD, timeout=within_s,
                          headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.json()["detections"]
    assert time.perf_counter() - started < within_s


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes (or ``timeout_s``)."""
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def status_line(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """The start of the server's answer, up to its status line's end (or what came before it
    closed): not the rest, which a dropped response's kernel buffer may still be trickling."""
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    return data


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def test_drip_fed_uploads_hold_no_place_and_end_in_408(hostile: Server) -> None:
    # 12 sockets announce 1 MB and send a byte every 0.5 s: before, each held an admission
    # place (8 here) for as long as it lived, and every good request got 503.
    drips = []
    for _ in range(12):
        sock = connect(hostile.url)
        sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 1000000\r\n\r\n\xff")
        drips.append(sock)
    started = time.perf_counter()
    try:
        # Each holds its place for UPLOAD_HOLD_MS (0.3 s here), then gives it back: a good
        # request is served long before the whole-upload deadline (4 s) would free them all.
        wait_until(lambda: served(hostile.url), 2.5,
                   "a place for a good request while the drips hold on")
        answered = 1
        while time.perf_counter() - started < 3:  # and every one after it, drips or not
            for sock in drips:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xd8")
            good_request(hostile.url)
            answered += 1
            time.sleep(0.2)  # the drips' pace
        assert answered >= 2
        answers = [read_all(sock, timeout_s=10) for sock in drips]
    finally:
        for sock in drips:
            sock.close()
    # Cut off by the whole-upload deadline (4 s) or, past MAX_SLOW_UPLOADS (8), sooner; one
    # that came while all places were held in its first moments was refused at the door.
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) >= 8 and all(b"request_timeout" in a for a in timed_out)
    assert all(a.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503")) for a in answers)
    assert time.perf_counter() - started < 15  # not 12 x read_all's 10 s
    good_request(hostile.url)


def test_header_floods_are_cut_at_the_limit_with_431(hostile: Server) -> None:
    before = rss_mb(hostile.process.pid)
    floods = [connect(hostile.url) for _ in range(8)]
    refused = 0
    try:
        for sock in floods:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        chunk = b"a" * 65536
        for _ in range(64):  # up to 4 MiB each: the server stops reading at 16 KiB
            for sock in floods:
                with contextlib.suppress(OSError):
                    sock.sendall(chunk)
        for sock in floods:
            answer = read_all(sock, timeout_s=10)
            refused += answer.startswith(b"HTTP/1.1 431")
    finally:
        for sock in floods:
            sock.close()
    assert refused == 8
    assert rss_mb(hostile.process.pid) - before < 50  # not 8 x 4 MiB kept
    # A complete request with a 1 MB header is refused too (it was served before).
    big = httpx.get(f"{hostile.url}/healthz", headers={"X-Big": "b" * 1_000_000}, timeout=10)
    assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
    good_request(hostile.url)
    assert metric_value(metrics(hostile.url), 'dfine_errors_total{code="headers_too_large"}') >= 9


def test_slow_headers_are_closed_with_408(hostile: Server) -> None:
    sock = connect(hostile.url)
    started = time.perf_counter()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        answer = read_all(sock, timeout_s=5)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert time.perf_counter() - started < 4  # HEADER_TIMEOUT_S is 1 here
    good_request(hostile.url)


def test_silent_connections_are_closed_and_the_cap_refuses_cleanly(hostile: Server) -> None:
    silent = [connect(hostile.url) for _ in range(70)]  # MAX_CONNECTIONS is 60 here
    try:
        # Each read ends when the server closes: the extra ones at once, with their 503.
        extra = [read_all(sock, timeout_s=10) for sock in silent[60:]]
        assert all(a.startswith(b"HTTP/1.1 503") and b"too many connections" in a
                   for a in extra)
        # Within the header timeout (1 s) the silent ones are closed, and the service answers.
        closed = [read_all(sock, timeout_s=10) for sock in silent[:60]]
        assert all(a.startswith(b"HTTP/1.1 408") for a in closed)
    finally:
        for sock in silent:
            sock.close()
    assert httpx.get(f"{hostile.url}/healthz", timeout=5).status_code == 200
    good_request(hostile.url)


def test_clients_that_never_read_renders_hold_bounded_memory(hostile: Server) -> None:
    # A 2000x2000 noisy PNG (12 MB) renders to a PNG as large; the readers never read.
    noise = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
    body = encode(noise, ".png")
    before = rss_mb(hostile.process.pid)
    dropped = 'dfine_errors_total{code="client_closed"}'
    dropped_before = metric_value(metrics(hostile.url), dropped)
    stuck = []
    try:
        for _ in range(6):
            sock = connect(hostile.url)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"POST /detect/render?format=png HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: image/png\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            stuck.append(sock)
            time.sleep(0.3)  # one after another: the first holds the one render place
        good_request(hostile.url)  # /detect is not held up by the renders (5 s at most)
        peak = rss_mb(hostile.process.pid)
        # WRITE_TIMEOUT_S is 2: the stuck one is dropped (and counted) before anyone reads.
        wait_for_metrics(hostile.url, lambda text: metric_value(text, dropped) > dropped_before,
                         30, "the render nobody reads dropped as client_closed")
        answers = [status_line(sock) for sock in stuck]
    finally:
        for sock in stuck:
            sock.close()
    # One render at a time (MAX_RENDERS 1): the others were refused at once.
    assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) >= 4
    assert peak - before < 400, (before, peak)
    good_request(hostile.url)
    rendered = httpx.post(f"{hostile.url}/detect/render", content=GOOD, timeout=10,
                          headers={"Content-Type": "image/jpeg"})
    assert rendered.status_code == 200 and rendered.content[:2] == b"\xff\xd8"


def test_a_client_gone_mid_upload_is_counted_499_without_a_traceback(hostile: Server) -> None:
    before = metrics(hostile.url)
    sock = connect(hostile.url)
    sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: 100000\r\n\r\n" + GOOD[:1000])
    time.sleep(0.2)  # mid-upload: the server has the headers and part of the body
    sock.close()
    gone = 'dfine_requests_total{endpoint="/detect",status="499"}'
    after = wait_for_metrics(
        hostile.url, lambda text: metric_value(text, gone) > metric_value(before, gone), 30,
        "the request whose client went counted as a 499")
    assert metric_value(after, gone) - metric_value(before, gone) == 1
    assert metric_value(after, 'dfine_errors_total{code="internal"}') == 0
    assert "Traceback" not in hostile.log()
    good_request(hostile.url)


def test_a_path_cannot_forge_a_line_of_the_text_access_log(hostile: Server) -> None:
    httpx.get(f"{hostile.url}/x%0A127.0.0.1%20GET%20/forged%20200", timeout=5)
    forged = wait_until(
        lambda: [line for line in hostile.log().splitlines()
                 if "/x\\x0a127.0.0.1 GET /forged 200" in line], 30, "the access log line")
    lines = hostile.log().splitlines()
    assert " id=" in forged[0]  # the access line carries the request id
    assert not any(line.startswith("127.0.0.1 GET /forged") for line in lines)
