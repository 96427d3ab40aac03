"""READ_TIMEOUT_S and UPLOAD_TIMEOUT_S on a real server, with clients on raw sockets that stall
or drip (the faults): a stall ends in 408 "no data", a drip that keeps sending is read to
the end, a drip past the whole-upload deadline ends in 408, and the service keeps serving."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Server, encode, render_scene, run_server

GOOD = encode(render_scene(3)[0])
READ_TIMEOUT_S = 2  # with room for a loaded machine: the drips below pause 0.3-0.5 s
UPLOAD_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("deadlines"), "--instant-engine",
                    "--read-timeout-s", str(READ_TIMEOUT_S),
                    "--upload-timeout-s", str(UPLOAD_TIMEOUT_S)) as running:
        yield running


def start_upload(url: str, first: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(GOOD) + first)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the one response on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def test_a_stalled_upload_ends_in_408_no_data(server: Server) -> None:
    started = time.perf_counter()
    with start_upload(server.url, GOOD[:100]) as sock:
        status, body = answer(sock)
    assert status == 408, body
    assert body == {"error": {"code": "request_timeout",
                              "message": f"no data for {READ_TIMEOUT_S} s"}}
    # Not before the read timeout; well before the whole-upload deadline.
    assert READ_TIMEOUT_S * 0.9 <= time.perf_counter() - started < UPLOAD_TIMEOUT_S


def test_a_drip_faster_than_the_read_timeout_is_read_to_the_end(server: Server) -> None:
    # 10 pieces, 0.3 s apart: longer in all than the read timeout, each gap well under it.
    pieces = [GOOD[k * len(GOOD) // 10:(k + 1) * len(GOOD) // 10] for k in range(10)]
    started = time.perf_counter()
    with start_upload(server.url, pieces[0]) as sock:
        for piece in pieces[1:]:
            time.sleep(READ_TIMEOUT_S * 0.15)  # the client's pace, not a wait for the server
            sock.sendall(piece)
        status, body = answer(sock)
    assert time.perf_counter() - started > READ_TIMEOUT_S
    assert status == 200, body
    assert "detections" in body


def test_a_drip_past_the_whole_upload_deadline_ends_in_408(server: Server) -> None:
    started = time.perf_counter()
    sent = 0
    with start_upload(server.url, GOOD[:1]) as sock:
        sock.settimeout(READ_TIMEOUT_S * 0.25)
        data = b""
        while not data and time.perf_counter() - started < UPLOAD_TIMEOUT_S * 3:
            try:
                data = sock.recv(65536)  # the answer, or a pause between two bytes
            except TimeoutError:
                sent += 1
                sock.sendall(GOOD[sent:sent + 1])
        sock.settimeout(15)
        head, _, body = data.partition(b"\r\n\r\n")
        while len(body) < length(data):
            body += sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert f"the upload took longer than {UPLOAD_TIMEOUT_S} s".encode() in body
    assert sent < len(GOOD) - 1
    assert time.perf_counter() - started >= UPLOAD_TIMEOUT_S * 0.9
    # And the service goes on serving.
    response = httpx.post(f"{server.url}/detect", content=GOOD, timeout=15,
                          headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
