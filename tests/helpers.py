"""Shared test helpers: rendered scenes, encoders, IoU, and a real server in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import cv2
import httpx
import numpy as np

from app.bench.cli import free_port
from app.bench.stats import metric_value
from models.synthetic import CLASSES, render

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "dfine_n_shapes.onnx"


def render_scene(seed: int) -> tuple[np.ndarray, list[tuple[str, tuple[float, ...]]]]:
    """A synthetic image (BGR) and its shapes as (label, xyxy)."""
    image, shapes = render(seed)
    truth = [(CLASSES[s.class_id], (s.bbox_xywh[0], s.bbox_xywh[1],
                                    s.bbox_xywh[0] + s.bbox_xywh[2],
                                    s.bbox_xywh[1] + s.bbox_xywh[3])) for s in shapes]
    return image, truth


def encode(image: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_same_detections(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal up to float noise: a batched run may differ from a single one in the last bits."""
    assert [d["label"] for d in got] == [d["label"] for d in want]
    for a, b in zip(got, want):
        assert abs(a["score"] - b["score"]) < 1e-3
        assert box_iou(tuple(a["box"].values()), tuple(b["box"].values())) > 0.99


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               interval_s: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that. Fails after
    ``timeout_s`` naming ``what`` and the last value seen: a test waits for a condition, never
    for a fixed time (a loaded CI machine can be several times slower)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} "
                                 f"(last: {value!r})")
        time.sleep(interval_s)


@overload
async def wait_until_async(predicate: Callable[[], Awaitable[T]], timeout_s: float, what: str,
                           interval_s: float = ...) -> T: ...


@overload
async def wait_until_async(predicate: Callable[[], T], timeout_s: float, what: str,
                           interval_s: float = ...) -> T: ...


async def wait_until_async(predicate: Callable[[], Any], timeout_s: float, what: str,
                           interval_s: float = 0.005) -> Any:
    """``wait_until`` inside an event loop: sleeps without blocking it; ``predicate`` may be a
    coroutine function."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} "
                                 f"(last: {value!r})")
        await asyncio.sleep(interval_s)


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    """The service's /metrics text."""
    return httpx.get(f"{url}/metrics", headers=headers, timeout=30).text


def metric(url: str, selector: str, headers: dict[str, str] | None = None) -> float:
    """One metric (summed over the series ``selector`` matches) from the service's /metrics."""
    return metric_value(scrape(url, headers), selector)


def wait_for_metrics(url: str, condition: Callable[[str], bool], timeout_s: float, what: str,
                     headers: dict[str, str] | None = None, interval_s: float = 0.05) -> str:
    """The first /metrics text (polled) that ``condition`` accepts; fails after ``timeout_s``."""

    def accepted() -> str:
        text = scrape(url, headers)
        return text if condition(text) else ""

    return wait_until(accepted, timeout_s, what, interval_s)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def detect_concurrently(url: str, images: list[bytes], clients: int
                        ) -> list[list[dict[str, Any]]]:
    """``clients`` JPEG uploads to /detect at once (client k sends image k mod len(images));
    each answer's detections, in client order. Every answer must be a 200."""
    import asyncio

    async def client(k: int) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as http:
            response = await http.post(f"{url}/detect", content=images[k % len(images)],
                                       headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200, response.text
            return list(response.json()["detections"])

    async def all_clients() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(client(k) for k in range(clients)))

    return asyncio.run(all_clients())


@contextlib.contextmanager
def run_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
               ready_timeout_s: float = 60) -> Iterator[Server]:
    """``python -m app`` on a free loopback port, waited on until /readyz is 200."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DFINE_")}
    environment["DFINE_GRPC_PORT"] = "0"  # off unless a test asks (flags win): no port clash
    environment.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def serve_in_thread(app: Any, ready_timeout_s: float = 60) -> Iterator[str]:
    """A real uvicorn serving ``app`` on a free loopback port, in a thread of this process
    (for apps built here, e.g. around a fault-injecting engine)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("in-thread server not ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def protobuf_field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field as on the wire (tag, varint length, value): for
    messages no generated encoder would write."""
    return _varint(number << 3 | 2) + _varint(len(value)) + value
