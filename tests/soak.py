"""Soak: many requests against a real server; after warm-up its resident memory must grow by
less than 10% and it must hold no more file descriptors than before.

    python -m tests.soak --requests 20000      (make soak)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from app.bench.images import synthetic_jpegs
from app.bench.load import Connection
from tests.helpers import run_server


def rss_mb(pid: int | str, peak: bool = False) -> float:
    """Resident memory of a process (pid or "self"), or its peak so far (VmHWM)."""
    field = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def send(port: int, bodies: list[bytes], total: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    order = itertools.count()

    async def client() -> None:
        connection = Connection("127.0.0.1", port)
        try:
            while (index := next(order)) < total:
                status, _ = await connection.request("POST", "/detect",
                                                     bodies[index % len(bodies)], "image/jpeg")
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return statuses


def settled(count: Callable[[], int], target: int, timeout_s: float) -> int:
    """``count()`` once it is at most ``target``, or its value after ``timeout_s`` (for the
    caller to judge)."""
    deadline = time.monotonic() + timeout_s
    while (value := count()) > target and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def soak(requests: int, warmup: int, concurrency: int) -> dict[str, float]:
    bodies = synthetic_jpegs(8, 320, 240)
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp)) as server:
        pid, port = server.process.pid, int(server.url.rsplit(":", 1)[1])
        asyncio.run(send(port, bodies, warmup, concurrency))
        rss_before, fds_before = rss_mb(pid), open_fds(pid)
        started = time.perf_counter()
        statuses = asyncio.run(send(port, bodies, requests, concurrency))
        elapsed = time.perf_counter() - started
        # The server closes its side of each connection once it sees the client's close: give
        # it time to, without waiting longer than that takes.
        fds_after = settled(lambda: open_fds(pid), fds_before, timeout_s=15)
        rss_after = rss_mb(pid)
    return {"requests": requests, "ok": statuses.get(200, 0), "seconds": round(elapsed, 1),
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
            "rss_growth": round(rss_after / rss_before - 1, 4),
            "fds_before": fds_before, "fds_after": fds_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    result = soak(args.requests, args.warmup, args.concurrency)
    print(result)
    ok = (result["ok"] == args.requests and result["rss_growth"] < 0.10
          and result["fds_after"] <= result["fds_before"])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
