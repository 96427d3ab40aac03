"""``dfine-serve bench-swap``: a new model version rolled in under load, measured.

The service serves a repository of one model (MODEL_CONTROL=poll); closed-loop clients send
/detect non-stop; after a steady phase a new version is dropped in as operators should (written
to a temporary name, then renamed into place). Reported: every answer that is not a 200 (the
target is none), the time from the rename to the first answer by the new version and to the
old version's release, and p99 latency and throughput before and during the swap (the window
from the rename until the old version is released, at least a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from app.bench.cli import _server, free_port
from app.bench.images import synthetic_jpegs
from app.bench.load import Connection, Endpoint
from app.config import DEFAULT_MODEL_PATH


@dataclass
class Answer:
    sent: float  # perf_counter
    latency_s: float
    status: int  # 0: no answer (connection error)
    version: int | None


@dataclass
class SwapReport:
    clients: int
    requests: int
    not_ok: dict[str, int] = field(default_factory=dict)  # status -> count; {} is the target
    first_new_answer_s: float | None = None  # from the rename
    old_released_s: float | None = None  # from the rename
    steady_p99_ms: float | None = None
    swap_p99_ms: float | None = None
    steady_rps: float | None = None
    swap_rps: float | None = None
    old_answers_after_first_new: int = 0  # requests admitted before the swap, finishing


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2)


def install_atomically(source: Path, version_dir: Path) -> float:
    """Copy ``source`` to ``version_dir/model.onnx`` through a temporary name and a rename, so
    that a scan sees the whole file or none; the rename's perf_counter."""
    version_dir.mkdir(parents=True, exist_ok=True)
    temporary = version_dir / ".model.onnx.partial"
    shutil.copyfile(source, temporary)
    with temporary.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, version_dir / "model.onnx")
    return time.perf_counter()


async def _released(url: str, name: str, version: int, since: float) -> float | None:
    """Seconds from ``since`` until the index says ``version`` is no longer loaded."""
    endpoint = Endpoint.parse(url)
    connection = Connection(endpoint.host, endpoint.port)
    try:
        for _ in range(1200):
            status, body = await connection.request("POST", "/v2/repository/index", b"{}",
                                                    "application/json")
            if status == 200:
                states = {(e["name"], e.get("version")): e["state"] for e in orjson.loads(body)}
                if states.get((name, str(version))) in (None, "UNAVAILABLE"):
                    return time.perf_counter() - since
            await asyncio.sleep(0.05)
    finally:
        connection.close()
    return None


async def swap_under_load(url: str, repository: Path, name: str, new_model: Path,
                          old_version: int, new_version: int, clients: int = 16,
                          steady_s: float = 5.0, after_s: float = 5.0,
                          bodies: list[bytes] | None = None) -> SwapReport:
    """Load ``url`` with ``clients`` closed-loop /detect clients; after ``steady_s`` install
    ``new_model`` as ``new_version``; stop ``after_s`` after the old version is released."""
    bodies = bodies or synthetic_jpegs(8)
    endpoint = Endpoint.parse(url)
    answers: list[Answer] = []
    stop = asyncio.Event()

    async def client(k: int) -> None:
        connection = Connection(endpoint.host, endpoint.port)
        index = k
        try:
            while not stop.is_set():
                sent = time.perf_counter()
                try:
                    status, payload = await connection.request(
                        "POST", f"/detect?model={name}", bodies[index % len(bodies)],
                        "image/jpeg")
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    status, payload = 0, b""
                version = orjson.loads(payload).get("version") if status == 200 else None
                answers.append(Answer(sent, time.perf_counter() - sent, status, version))
                index += clients
        finally:
            connection.close()

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(steady_s)
    started = time.perf_counter() - steady_s
    renamed = await asyncio.to_thread(install_atomically, new_model,
                                      repository / name / str(new_version))
    released = await _released(url, name, old_version, renamed)
    await asyncio.sleep(after_s)
    stop.set()
    await asyncio.gather(*tasks)

    report = SwapReport(clients=clients, requests=len(answers))
    report.not_ok = {str(k): v for k, v in Counter(
        a.status for a in answers if a.status != 200).items()}
    new = [a for a in answers if a.version == new_version]
    if new:
        first = min(a.sent + a.latency_s for a in new)
        report.first_new_answer_s = round(first - renamed, 3)
        report.old_answers_after_first_new = sum(
            1 for a in answers if a.version == old_version and a.sent + a.latency_s > first)
    report.old_released_s = None if released is None else round(released, 3)
    window_end = renamed + max(1.0, released or 0.0)
    steady = [a for a in answers if started + 1 <= a.sent and a.sent + a.latency_s < renamed]
    during = [a for a in answers if renamed <= a.sent + a.latency_s <= window_end]
    report.steady_p99_ms = _p99([a.latency_s for a in steady])
    report.swap_p99_ms = _p99([a.latency_s for a in during])
    steady_span = renamed - (started + 1)
    report.steady_rps = round(len(steady) / steady_span, 1) if steady_span > 0 else None
    report.swap_rps = round(len(during) / (window_end - renamed), 1)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-serve bench-swap", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH,
                        help="the model served as version 1 and rolled in as version 2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=5.0)
    parser.add_argument("--poll-s", type=float, default=1.0, help="REPOSITORY_POLL_S")
    parser.add_argument("--service-args", default="--providers cpu",
                        help="more flags for the service")
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfine-swap-") as scratch:
        repository = Path(scratch) / "repository"
        install_atomically(args.model, repository / "detector" / "1")
        port = free_port()
        command = [sys.executable, "-m", "app", "--port", str(port),
                   "--model-repository", str(repository), "--model-control", "poll",
                   "--repository-poll-s", str(args.poll_s), "--log-level", "warning",
                   "--grpc-port", "0",
                   *args.service_args.split()]
        with _server(command, port, "/readyz", "service", Path(scratch) / "service.log") as up:
            report = asyncio.run(swap_under_load(
                up.url, repository, "detector", args.model, 1, 2, args.clients,
                args.steady_s, args.after_s))
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
