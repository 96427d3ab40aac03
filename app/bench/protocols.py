"""The bench's clients for the Open Inference Protocol, beside /detect's (app.bench.load):
``v2-http`` (REST, the binary tensor extension both ways, as tritonclient.http sends by
default) and ``grpc`` (ModelInfer through the protocol's generated stub, one channel per
client, as tritonclient.grpc does). Each request is built once per image, before the clock
starts, so that the client's own work stays small beside the service's."""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson

from app.bench.load import Connection, Endpoint, Progress
from app.bench.stats import Sample

PROTOCOLS = ("detect", "v2-http", "grpc")
HEADER_BYTES = 512  # the JSON header, padded with spaces to one length for every image
OUTPUTS = ("labels", "boxes", "scores", "names")

Send = Callable[[int], Awaitable[Sample]]  # body index -> sample
Client = Callable[[], AbstractAsyncContextManager[Send]]


def v2_body(image: bytes) -> bytes:
    """One image as a binary-extension inference request, every output asked in binary."""
    header = orjson.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(image) + 4}}],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in OUTPUTS]})
    assert len(header) <= HEADER_BYTES
    return header.ljust(HEADER_BYTES) + struct.pack("<I", len(image)) + image


def v2_http_client(url: str, model: str, bodies: list[bytes],
                   headers: dict[str, str]) -> Client:
    endpoint = Endpoint.parse(url)
    path = f"/v2/models/{model}/infer"
    requests = [v2_body(b) for b in bodies]
    extra = {**headers, "Inference-Header-Content-Length": str(HEADER_BYTES)}

    @asynccontextmanager
    async def client() -> Any:
        connection = Connection(endpoint.host, endpoint.port, extra)

        async def send(index: int) -> Sample:
            started = time.perf_counter()
            try:
                status, _ = await connection.request("POST", path, requests[index])
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                status = 0
            return Sample(status, time.perf_counter() - started)

        try:
            yield send
        finally:
            connection.close()

    return client


def grpc_client(address: str, model: str, bodies: list[bytes],
                headers: dict[str, str]) -> Client:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    requests = []
    for body in bodies:
        request = pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "image", "BYTES"
        tensor.shape.append(1)
        request.raw_input_contents.append(struct.pack("<I", len(body)) + body)
        requests.append(request)
    metadata = tuple((k.lower(), v) for k, v in headers.items())
    refused = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}

    @asynccontextmanager
    async def client() -> Any:
        channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def send(index: int) -> Sample:
            started = time.perf_counter()
            try:
                await stub.ModelInfer(requests[index], metadata=metadata or None, timeout=60)
                status = 200
            except grpc.aio.AioRpcError as exc:
                status = 503 if exc.code() in refused else 500
            return Sample(status, time.perf_counter() - started)

        try:
            yield send
        finally:
            await channel.close()

    return client


async def closed_loop_with(make_client: Client, count: int, concurrency: int,
                           duration_s: float, progress: Progress | None = None
                           ) -> tuple[list[Sample], float]:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    samples: list[Sample] = []
    order = itertools.cycle(range(count))
    started = time.perf_counter()
    stop_at = started + duration_s

    async def one_client() -> None:
        async with make_client() as send:
            while time.perf_counter() < stop_at:
                samples.append(await send(next(order)))
                if progress:
                    progress(1)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return samples, time.perf_counter() - started
