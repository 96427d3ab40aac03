"""Times the round-2 attacks against a real server, with the slowest /healthz while each runs:
the figures of docs/limits-and-reliability.md, "Limits". Run on a checkout (this one, or an
older one to compare):

    python -m tests.hostile_timings exact|fast
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.helpers import encode, render_scene, run_server

GOOD = encode(render_scene(5)[0])


def bytes_table(elements: list[bytes], shape: int) -> tuple[bytes, int]:
    table = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [shape],
                                     "parameters": {"binary_data_size": len(table)}}]}).encode()
    return header + table, len(header)


def timed(label: str, send: Callable[[], httpx.Response], url: str) -> None:
    slowest, done = 0.0, threading.Event()

    def probe() -> None:
        nonlocal slowest
        while not done.is_set():
            started = time.perf_counter()
            httpx.get(url + "/healthz", timeout=60)
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.perf_counter()
    status = send().status_code
    took = time.perf_counter() - started
    done.set()
    prober.join()
    print(f"{label}: {status} in {took:.2f} s, slowest /healthz {slowest:.2f} s")


def main(mode: str) -> None:
    png = encode(render_scene(6)[0], ".png")
    chunk = struct.pack(">I4sI", 0, b"prIv", zlib.crc32(b"prIv"))
    sof = b"\xff\xc0\x00\x11\x08\x4e\x20\x4e\x20\x03\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    tiny = (b"\xff\xd8\xff\x00" + sof
            + b"\xff\xda\x00\x0c\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00")
    tiny += b"\x00" * (335 - len(tiny) - 2) + b"\xff\xd9"
    with run_server(Path(tempfile.mkdtemp()), "--preprocess", mode) as server:
        url = server.url

        def v2(body: bytes, header_length: int | None = None) -> httpx.Response:
            extra = ({"Inference-Header-Content-Length": str(header_length)}
                     if header_length else {})
            return httpx.post(f"{url}/v2/models/dfine_n_shapes/infer", content=body,
                              timeout=120, headers={"Content-Type": "application/octet-stream",
                                                    **extra})

        def detect(data: bytes, kind: str) -> httpx.Response:
            return httpx.post(f"{url}/detect", content=data, timeout=120,
                              headers={"Content-Type": kind})

        body, length = bytes_table([b""] * 4_000_000, 16)
        timed("v2 4M empty BYTES elements", lambda: v2(body, length), url)
        lists = (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ['
                 + b"[]," * 13_000_000 + b'"eA=="]}]}')
        timed("v2 40 MiB JSON of empty lists", lambda: v2(lists), url)
        padded = ('{"image": "' + base64.b64encode(GOOD).decode() + '", "junk": ['
                  + "1," * 1_400_000 + "1]}").encode()
        timed("detect JSON + 1.4M list items", lambda: detect(padded, "application/json"), url)
        jpeg = b"\xff\xd8" + b"\xff\xe0\x00\x02" * 4_000_000 + GOOD[2:]
        timed("JPEG of 4M empty APP0", lambda: detect(jpeg, "image/jpeg"), url)
        crowded = png[:33] + chunk * 1_300_000 + png[33:]
        timed("PNG of 1.3M empty chunks", lambda: detect(crowded, "image/png"), url)
        timed("335-byte JPEG, 20000x20000 behind FF 00", lambda: detect(tiny, "image/jpeg"),
              url)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "exact")
