"""What system shared memory saves the server: its CPU per request (user + system, from
/proc, every thread) for a preprocessed FP32 tensor of the model's input size sent in the
request body, against the same tensor read from a registered region, over tritonclient's
HTTP and gRPC clients, one request at a time.

    python -m app.bench.shm_cost [--requests 300] [--rounds 3] [--real-engine]

It starts its own service (``python -m app``, with the instant engine unless --real-engine,
so that the front end's share shows) with SHM_KEY_PREFIXES set, and prints, per transport and
way, the least of the rounds' CPU milliseconds per request (a shared machine only adds)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.bench.cli import free_port
from app.bench.stats import process_cpu_s

MODEL = Path(__file__).resolve().parents[2] / "models" / "dfine_n_shapes.onnx"
KEY = f"/dfine-bench-{os.getpid()}"


@contextlib.contextmanager
def service(model: Path, real_engine: bool) -> Iterator[tuple[subprocess.Popen[bytes], int,
                                                               int]]:
    http, grpc = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFINE_")}
    env.update(DFINE_SHM_KEY_PREFIXES="/dfine-bench-", DFINE_MODEL_PATH=str(model),
               DFINE_INSTANT_ENGINE="false" if real_engine else "true")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--host", "127.0.0.1",
         "--port", str(http), "--grpc-port", str(grpc)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{http}/readyz", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.1)
        yield process, http, grpc
    finally:
        process.terminate()
        process.wait(30)


def cpu_ms_per_request(pid: int, send: Callable[[], Any], requests: int, rounds: int
                       ) -> float:
    for _ in range(10):
        send()
    best = float("inf")
    for _ in range(rounds):
        started = process_cpu_s(pid)
        for _ in range(requests):
            send()
        best = min(best, (process_cpu_s(pid) - started) / requests)
    return round(best * 1000, 3)


def _sender(client: Any, model: str, given: Any) -> Callable[[], Any]:
    return lambda: client.infer(model, [given])


def main(argv: list[str] | None = None) -> None:
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    import tritonclient.utils.shared_memory as shm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--real-engine", action="store_true")
    args = parser.parse_args(argv)
    with service(args.model, args.real_engine) as (process, http_port, grpc_port):
        clients = {"http": (thttp, thttp.InferenceServerClient(f"127.0.0.1:{http_port}")),
                   "grpc": (tgrpc, tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}"))}
        metadata = clients["http"][1].get_model_metadata(args.model.stem)
        shape = [1, *metadata["inputs"][1]["shape"][1:]]  # images: [-1, 3, H, W]
        tensor = np.random.default_rng(0).random(shape, np.float32)
        region = shm.create_shared_memory_region("in", KEY, tensor.nbytes)
        try:
            shm.set_shared_memory_region(region, [tensor])
            clients["http"][1].register_system_shared_memory("in", KEY, tensor.nbytes)
            print(f"tensor {shape} FP32 ({tensor.nbytes} bytes), "
                  f"{'real' if args.real_engine else 'instant'} engine, "
                  f"{args.requests} requests x {args.rounds} rounds; server CPU ms/request:")
            for transport, (module, client) in clients.items():
                body = module.InferInput("images", shape, "FP32")
                body.set_data_from_numpy(tensor)
                shared = module.InferInput("images", shape, "FP32")
                shared.set_shared_memory("in", tensor.nbytes)
                results = {way: cpu_ms_per_request(
                    process.pid, _sender(client, args.model.stem, given), args.requests,
                    args.rounds) for way, given in (("body", body), ("region", shared))}
                print(f"  {transport}: body {results['body']}, region {results['region']} "
                      f"({results['body'] - results['region']:+.3f} saved)")
            clients["http"][1].unregister_system_shared_memory("in")
        finally:
            shm.destroy_shared_memory_region(region)


if __name__ == "__main__":
    main()
