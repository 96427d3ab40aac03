"""Load generation: closed loop at a fixed concurrency, open loop with Poisson arrivals.

A small HTTP/1.1 keep-alive client on asyncio streams: on a 2-core machine the load generator
shares the CPU with the server, so it must cost as little as possible.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from app.bench.images import content_type
from app.bench.stats import Sample

Progress = Callable[[int], None]


@dataclass
class Endpoint:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/")


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      media_type: str = "application/octet-stream") -> tuple[int, bytes]:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.extra}"
                f"Content-Type: {media_type}\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            self._writer.write(head.encode() + body)
            await self._writer.drain()
            status_line = await self._reader.readline()
            if not status_line:
                raise ConnectionError("server closed the connection")
            status = int(status_line.split()[1])
            length, close = 0, False
            while (line := await self._reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            payload = await self._reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            raise
        if close:
            self.close()
        return status, payload

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def fetch(url: str) -> bytes:
    endpoint = Endpoint.parse(url)
    connection = Connection(endpoint.host, endpoint.port)
    try:
        status, body = await connection.request("GET", endpoint.path)
    finally:
        connection.close()
    if status != 200:
        raise RuntimeError(f"GET {url}: {status}")
    return body


async def _send(connection: Connection, path: str, body: bytes, server_timing: bool = False
                ) -> Sample:
    started = time.perf_counter()
    try:
        status, payload = await connection.request("POST", path, body, content_type(body))
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        return Sample(0, time.perf_counter() - started)
    sample = Sample(status, time.perf_counter() - started)
    if server_timing and status == 200:
        sample.server_s = _server_total_s(payload)
    return sample


def _server_total_s(payload: bytes) -> float | None:
    """The service's own time for the request (``timing_ms.total``: decode to postprocess, what
    one in-process call measures), so that latency minus it is what HTTP adds."""
    try:
        return float(orjson.loads(payload)["timing_ms"]["total"]) / 1000
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                      headers: dict[str, str] | None = None,
                      progress: Progress | None = None,
                      server_timing: bool = False) -> tuple[list[Sample], float]:
    """``concurrency`` clients, each sending its next request when the last one is answered.
    ``server_timing``: read the service's own time from each answer (costs client CPU)."""
    endpoint = Endpoint.parse(url)
    samples: list[Sample] = []
    order = itertools.cycle(range(len(bodies)))
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client() -> None:
        connection = Connection(endpoint.host, endpoint.port, headers)
        try:
            while time.perf_counter() < stop_at:
                samples.append(await _send(connection, endpoint.path, bodies[next(order)],
                                           server_timing))
                if progress:
                    progress(1)
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


async def open_loop(url: str, bodies: list[bytes], rate_rps: float, duration_s: float,
                    headers: dict[str, str] | None = None, seed: int = 0,
                    max_outstanding: int = 1024,
                    progress: Progress | None = None) -> tuple[list[Sample], float]:
    """Requests arrive as a Poisson process at ``rate_rps``, whether or not earlier ones have
    been answered (up to ``max_outstanding`` connections)."""
    endpoint = Endpoint.parse(url)
    rng = random.Random(seed)
    samples: list[Sample] = []
    idle: list[Connection] = []
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()

    async def one(body: bytes) -> None:
        connection = idle.pop() if idle else Connection(endpoint.host, endpoint.port, headers)
        samples.append(await _send(connection, endpoint.path, body))
        idle.append(connection)
        if progress:
            progress(1)

    next_at = started
    for index in itertools.count():
        next_at += rng.expovariate(rate_rps)
        if next_at - started >= duration_s:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if len(tasks) < max_outstanding:
            task = asyncio.create_task(one(bodies[index % len(bodies)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    return samples, time.perf_counter() - started
