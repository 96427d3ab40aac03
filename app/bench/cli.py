"""``dfine-serve bench``: measure the service beside its in-process ceiling and a plain peer.

By default it starts each server itself on a free loopback port (the service with the given
flags, the peer from app/bench/peer.py), sweeps concurrencies in a closed loop, interleaving the
targets at each level so that a noisy machine drifts all of them alike, and writes JSON results
and a PNG plot. With ``--wrk`` it drives the service with wrk instead and reports its CPU per
request, per thread too (app/bench/wrk.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from app.bench.ceiling import ceiling_loop, engine_ceiling, single_call_ms
from app.bench.gpu import GpuSampler
from app.bench.images import folder_images, synthetic_jpegs
from app.bench.load import Endpoint, closed_loop, fetch, open_loop
from app.bench.plot import INSTALL_HINT, write_plot
from app.bench.protocols import PROTOCOLS, Client, closed_loop_with, grpc_client, v2_http_client
from app.bench.stats import RunResult, Sample, metric_value, process_cpu_s, summarize
from app.config import DEFAULT_MODEL_PATH, Settings, settings_from_args


class ProgressBar:
    """Work done, on one stderr line: against the time it should take, or with ``total``,
    against a count of items (``unit``)."""

    def __init__(self, label: str, expected_s: float = 0.0, total: int = 0,
                 unit: str = "requests") -> None:
        self.label, self.expected_s, self.total, self.unit = label, expected_s, total, unit
        self.count, self.started, self.shown = 0, time.perf_counter(), 0.0

    def __call__(self, n: int) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self.shown > 0.25 or self.count == self.total:
            self.shown = now
            elapsed = now - self.started
            done = self.count / self.total if self.total else elapsed / self.expected_s
            filled = min(20, int(20 * done))
            count = f"{self.count}/{self.total}" if self.total else f"{self.count}"
            sys.stderr.write(f"\r{self.label:<28} [{'#' * filled}{'.' * (20 - filled)}] "
                             f"{count} {self.unit}, {self.count / max(elapsed, 1e-9):.1f}/s")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 90 + "\r")
        sys.stderr.flush()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Started:
    url: str
    process: subprocess.Popen[bytes] | None  # None: a service the bench did not start

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


@contextlib.contextmanager
def _server(command: list[str], port: int, ready_path: str, name: str, log_path: Path,
            env: Mapping[str, str] | None = None) -> Iterator[Started]:
    """Start a server (in ``env``, else this process's environment), its stdout and stderr
    written to ``log_path`` (a pipe nobody reads would lose its warnings and, once full, block
    it), and wait until it is ready."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                error = log_path.read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {process.returncode} ({log_path}): "
                                   f"{error[-2000:]}")
            with contextlib.suppress(OSError, RuntimeError):
                asyncio.run(fetch(url + ready_path))
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not become ready (its log: {log_path})")
            time.sleep(0.2)
        yield Started(url, process)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


async def _service_metrics(url: str) -> str:
    return (await fetch(url + "/metrics")).decode()


def _cpu_since(pid: int | None, cpu_before: float) -> float | None:
    """CPU seconds the server ``pid`` used since it had used ``cpu_before``; None without one."""
    return None if pid is None else process_cpu_s(pid) - cpu_before


async def _measure_service(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                           headers: dict[str, str], rate: float | None = None,
                           pid: int | None = None, client: Client | None = None,
                           target: str = "service") -> RunResult:
    """The service under ``concurrency`` closed-loop clients (or an open loop at ``rate``):
    /detect's, or ``client``'s (another protocol, app.bench.protocols)."""
    before = await _service_metrics(url)
    peak_rss = metric_value(before, "process_resident_memory_bytes")
    stop = asyncio.Event()

    async def watch_rss() -> None:
        nonlocal peak_rss
        while not stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                text = await _service_metrics(url)
                peak_rss = max(peak_rss, metric_value(text, "process_resident_memory_bytes"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    watcher = asyncio.create_task(watch_rss())
    label = f"{target} c={concurrency}" if rate is None else f"{target} {rate:g} req/s"
    bar = ProgressBar(label, duration_s)
    samples: list[Sample]
    cpu_before = process_cpu_s(pid) if pid else 0.0
    with GpuSampler() as gpu:
        if client is not None:
            samples, elapsed = await closed_loop_with(client, len(bodies), concurrency,
                                                      duration_s, bar)
        elif rate is None:
            # At c=1 each answer's own timing shows what HTTP adds to one in-process call; at
            # higher loads parsing every answer would cost the client more CPU than it is worth.
            samples, elapsed = await closed_loop(url + "/detect", bodies, concurrency,
                                                 duration_s, headers, bar,
                                                 server_timing=concurrency == 1)
        else:
            samples, elapsed = await open_loop(url + "/detect", bodies, rate, duration_s,
                                               headers, progress=bar)
    bar.close()
    cpu_s = _cpu_since(pid, cpu_before)
    stop.set()
    await watcher
    after = await _service_metrics(url)
    result = summarize(target, "closed" if rate is None else "open",
                       concurrency if rate is None else rate, samples, elapsed, cpu_s=cpu_s)
    def delta(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    images, batches = delta("dfine_images_total"), delta("dfine_batch_size_count")
    result.avg_batch_size = round(images / batches, 2) if batches else None
    result.rss_mb = round(peak_rss / 1e6, 1)
    return _with_gpu(result, gpu)


def _with_gpu(result: RunResult, gpu: GpuSampler) -> RunResult:
    result.gpu_busy_pct, result.gpu_memory_mb = gpu.busy_pct, gpu.memory_mb
    return result


async def _measure_peer(url: str, bodies: list[bytes], concurrency: int, duration_s: float,
                        pid: int | None) -> RunResult:
    bar = ProgressBar(f"peer c={concurrency}", duration_s)
    cpu_before = process_cpu_s(pid) if pid else 0.0
    with GpuSampler() as gpu:
        samples, elapsed = await closed_loop(url + "/detect", bodies, concurrency, duration_s,
                                             progress=bar)
    bar.close()
    result = summarize("peer", "closed", concurrency, samples, elapsed,
                       cpu_s=_cpu_since(pid, cpu_before))
    result.avg_batch_size = 1.0
    return _with_gpu(result, gpu)


async def _measure_ceiling(settings: Settings, bodies: list[bytes], concurrency: int,
                           duration_s: float, instances: list[int]) -> RunResult:
    """The best of the in-process configurations tried (engine runs in flight)."""
    best: RunResult | None = None
    for count in instances:
        bar = ProgressBar(f"ceiling c={concurrency} i={count}", duration_s)
        tuned = settings.model_copy(update={"instances": count})
        with GpuSampler() as gpu:
            run = await ceiling_loop(tuned, bodies, concurrency, duration_s, bar)
        bar.close()
        result = _with_gpu(summarize("ceiling", "closed", concurrency, run.samples,
                                     run.elapsed_s, cpu_s=run.cpu_s), gpu)
        result.avg_batch_size = round(run.avg_batch_size, 2)
        result.extra = {"instances": count}
        if best is None or result.throughput_rps > best.throughput_rps:
            best = result
    assert best is not None
    return best


def _table(results: list[RunResult]) -> str:
    lines = ["| target | load | req/s | p50 ms | p90 ms | p99 ms | max ms | avg batch | errors |"
             " RSS MB | CPU ms/req | GPU busy % |", "|---" * 12 + "|"]
    for r in results:
        load = f"c={r.load:g}" if r.mode == "closed" else f"{r.load:g} req/s"
        lat = r.latency_ms
        lines.append(
            f"| {r.target} | {load} | {r.throughput_rps:.1f} | {lat['p50']:.1f} | "
            f"{lat['p90']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | "
            f"{r.avg_batch_size if r.avg_batch_size is not None else '-'} | "
            f"{json.dumps(r.errors) if r.errors else '-'} | "
            f"{r.rss_mb if r.rss_mb is not None else '-'} | "
            f"{r.cpu_ms_per_request if r.cpu_ms_per_request is not None else '-'} | "
            f"{r.gpu_busy_pct if r.gpu_busy_pct is not None else '-'} |")
    return "\n".join(lines)


def throughput_ratios(results: list[RunResult], engine_best: float | None = None
                      ) -> dict[str, dict[str, float]]:
    """The service against the other targets at each concurrency, and against the engine
    ceiling (its best batch size's images/s) when given."""
    by = {(r.target, r.load): r for r in results if r.mode == "closed"}
    ratios: dict[str, dict[str, float]] = {}
    for (target, load), service in by.items():
        if target != "service":
            continue
        entry = {}
        for other in ("ceiling", "peer", "front-end"):
            if (other, load) in by and by[(other, load)].throughput_rps:
                entry[f"service/{other}"] = round(
                    service.throughput_rps / by[(other, load)].throughput_rps, 3)
        if engine_best:
            entry["service/engine ceiling"] = round(service.images_per_s / engine_best, 3)
        # Other protocols to the same service: what each costs against /detect.
        for other in ("service-v2-http", "service-grpc"):
            if (other, load) in by and service.throughput_rps:
                entry[f"{other}/service"] = round(
                    by[(other, load)].throughput_rps / service.throughput_rps, 3)
        ratios[f"c={load:g}"] = entry
    # Overload against the best the machine did in-process at any concurrency.
    best = max((r.throughput_rps for r in by.values() if r.target == "ceiling"), default=0.0)
    for r in results:
        if r.target == "service-overload" and best:
            ratios[f"overload c={r.load:g}"] = {
                "service/best ceiling": round(r.throughput_rps / best, 3)}
    return ratios


def median_run(runs: list[RunResult]) -> RunResult:
    """The run with the median throughput (the lower middle one for an even count), its
    siblings' throughputs kept in ``extra``: one noisy run neither makes nor breaks a ratio."""
    ranked = sorted(runs, key=lambda r: r.throughput_rps)
    chosen = ranked[(len(ranked) - 1) // 2]
    if len(runs) > 1:
        chosen.extra = {**chosen.extra, "repeats_rps": [r.throughput_rps for r in runs]}
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfine-serve bench", description=__doc__)
    p.add_argument("--url", help="bench a running service instead of starting one")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--service-args", default="",
                   help="flags for the service the bench starts, e.g. '--instances 2'")
    p.add_argument("--concurrency", help="closed-loop sweep, comma list (default: 1,8,32; "
                                         "with --wrk: 64)")
    p.add_argument("--rate", type=float, action="append", default=[],
                   help="also an open loop at this many requests/s (Poisson); repeatable")
    p.add_argument("--duration-s", type=float, default=10.0, help="per measurement")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every target this many times, interleaved, and report each "
                        "one's median run (for noisy machines)")
    p.add_argument("--images", type=Path, help="folder of images (default: synthetic JPEGs)")
    p.add_argument("--count", type=int, default=16, help="synthetic images to generate")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-providers", choices=("cpu", "cuda"), default="cpu",
                   help="where the plain peer runs its model")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the in-process ceiling (the service's code without HTTP)")
    p.add_argument("--no-engine-ceiling", action="store_true",
                   help="skip the engine ceiling (the engine alone, by batch size)")
    p.add_argument("--no-single-call", action="store_true",
                   help="skip the single in-process call (it loads the model once more)")
    p.add_argument("--ceiling-instances", default="1,2",
                   help="engine runs in flight to try for the ceiling; the best counts")
    p.add_argument("--front-end", action="store_true",
                   help="also the service with its engine replaced by one that answers at "
                        "once (--instant-engine): what the front end carries alone")
    p.add_argument("--overload", type=int, default=0, metavar="C",
                   help="also run C clients against a service with --max-queue "
                        "OVERLOAD_QUEUE (e.g. 64)")
    p.add_argument("--overload-queue", type=int, default=8)
    p.add_argument("--protocol", default="detect",
                   help="how clients call the service, a comma list of detect (POST /detect), "
                        "v2-http (the Open Inference Protocol's REST form, binary tensors) and "
                        "grpc (its gRPC form): each a target of its own, in the same run")
    p.add_argument("--grpc-address", help="with --url: the service's gRPC host:port "
                                          "(default: its host, port 8001)")
    p.add_argument("--api-key", help="sent as X-API-Key")
    wrk = p.add_argument_group(
        "wrk mode", "--wrk drives the service with wrk (a C client) instead, and reports req/s "
        "and the service's CPU per request, per thread too, over every process of it (/proc); "
        "the flags for the other targets (peer, ceilings, --rate, --overload, --protocol) do "
        "not apply. Writes wrk.json in --out")
    wrk.add_argument("--wrk", action="store_true",
                     help="measure with wrk; with --front-end the service runs with its instant "
                          "engine only, else with the model")
    wrk.add_argument("--wrk-requests", default="tiny,photo",
                     help="comma list of tiny (a 64x48 JPEG), photo (a WIDTHxHEIGHT JPEG) and "
                          "multipart (the photo as the multipart part 'image')")
    wrk.add_argument("--wrk-threads", type=int, default=0,
                     help="wrk's threads; 0: a quarter of the cores, 1 to 4")
    wrk.add_argument("--wrk-warmup-s", type=float, default=2.0,
                     help="wrk before each measured run, not counted (whole seconds)")
    wrk.add_argument("--compare", action="append", default=[], metavar="'NAME=VALUE ...'",
                     help="a service configuration to measure, as its environment (a "
                          "setting's name gets its DFINE_ prefix: 'FRONTENDS=2'); repeatable, "
                          "each one a target, interleaved round by round")
    wrk.add_argument("--pid", type=int,
                     help="with --url: the running service's PID, whose processes and threads "
                          "are measured")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    return p


def _service_command(args: argparse.Namespace, port: int, *flags: str) -> list[str]:
    """``python -m app`` for the bench's model on ``port``, logging at info, then ``flags``."""
    return [sys.executable, "-m", "app", "--model-path", str(args.model), "--port", str(port),
            "--log-level", "info", "--grpc-port", "0", *flags]


def _settings_for(model: Path, service_args: str) -> Settings:
    return settings_from_args(["--model-path", str(model), *shlex.split(service_args)])


async def _run(args: argparse.Namespace, service: Started, peer: Started | None,
               front_end: Started | None, bodies: list[bytes], settings: Settings
               ) -> list[RunResult]:
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    results: list[RunResult] = []
    instances = [int(v) for v in args.ceiling_instances.split(",") if v]
    clients = _protocol_clients(args, service, bodies, headers)
    for concurrency in [int(v) for v in args.concurrency.split(",") if v]:
        runs: dict[str, list[RunResult]] = {}
        for _ in range(args.repeat):
            for target, client in clients.items():
                runs.setdefault(target, []).append(await _measure_service(
                    service.url, bodies, concurrency, args.duration_s, headers,
                    pid=service.pid, client=client, target=target))
            if peer:
                runs.setdefault("peer", []).append(await _measure_peer(
                    peer.url, bodies, concurrency, args.duration_s, peer.pid))
            if front_end:
                measured = await _measure_service(front_end.url, bodies, concurrency,
                                                  args.duration_s, headers, pid=front_end.pid)
                measured.target = "front-end"
                runs.setdefault("front-end", []).append(measured)
            if not args.no_ceiling:
                runs.setdefault("ceiling", []).append(await _measure_ceiling(
                    settings, bodies, concurrency, args.duration_s, instances))
        chosen = [median_run(target_runs) for target_runs in runs.values()]
        results.extend(chosen)
        for line in _table(chosen).splitlines()[2:]:
            print(line, flush=True)
    for rate in args.rate:
        results.append(await _measure_service(service.url, bodies, 0, args.duration_s,
                                              headers, rate=rate, pid=service.pid))
    return results


def _protocols(args: argparse.Namespace) -> list[str]:
    chosen = [p.strip() for p in args.protocol.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PROTOCOLS))
    if unknown or not chosen:
        raise SystemExit(f"dfine-serve bench: --protocol: unknown {unknown or chosen}; "
                         f"choose from {', '.join(PROTOCOLS)}")
    return chosen


def _protocol_clients(args: argparse.Namespace, service: Started, bodies: list[bytes],
                      headers: dict[str, str]) -> dict[str, Client | None]:
    """The service's targets, one per protocol: "service" is /detect, as before."""
    name = args.model_name
    clients: dict[str, Client | None] = {}
    for protocol in _protocols(args):
        if protocol == "detect":
            clients["service"] = None
        elif protocol == "v2-http":
            clients["service-v2-http"] = v2_http_client(service.url, name, bodies, headers)
        else:
            clients["service-grpc"] = grpc_client(args.grpc_address, name, bodies, headers)
    return clients


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.concurrency = args.concurrency or ("64" if args.wrk else "1,8,32")
    if args.wrk:
        from app.bench.wrk import main as wrk_main  # it imports this module

        wrk_main(args)
        return
    protocols = _protocols(args)
    bodies = (folder_images(args.images, args.count) if args.images
              else synthetic_jpegs(args.count, args.width, args.height))
    settings = _settings_for(args.model, args.service_args)
    python = sys.executable
    with contextlib.ExitStack() as stack:
        service = Started(args.url, None)
        if args.url is None:
            port = free_port()
            grpc_flags: list[str] = []
            if "grpc" in protocols:
                grpc_port = free_port()
                args.grpc_address = f"127.0.0.1:{grpc_port}"
                grpc_flags = ["--grpc-port", str(grpc_port)]
            service = stack.enter_context(_server(
                _service_command(args, port, *shlex.split(args.service_args), *grpc_flags),
                port, "/readyz", "service", args.out / "service.log"))
        elif args.grpc_address is None:
            args.grpc_address = f"{Endpoint.parse(args.url).host}:8001"
        args.model_name = args.model.stem  # what the service calls it, unless /model says
        with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError):
            args.model_name = json.loads(asyncio.run(fetch(service.url + "/model")))["name"]
        peer = None
        if not args.no_peer:
            port = free_port()
            peer = stack.enter_context(_server(
                [python, "-m", "app.bench.peer", "--model", str(args.model), "--port",
                 str(port), "--providers", args.peer_providers], port, "/docs", "peer",
                args.out / "peer.log"))
        front_end = None
        if args.front_end:
            port = free_port()
            front_end = stack.enter_context(_server(
                _service_command(args, port, *shlex.split(args.service_args),
                                 "--instant-engine"),
                port, "/readyz", "front end (instant engine)", args.out / "front-end.log"))
        idle = asyncio.run(_service_metrics(service.url))
        idle_rss_mb = round(metric_value(idle, "process_resident_memory_bytes") / 1e6, 1)
        service_engine = None  # how it runs: buckets, their memory, precision (from /model)
        with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError):
            service_engine = json.loads(asyncio.run(fetch(service.url + "/model")))["engine"]
        results = asyncio.run(_run(args, service, peer, front_end, bodies, settings))
    single_ms = None if args.no_single_call else asyncio.run(single_call_ms(settings, bodies[0]))
    engine = (None if args.no_engine_ceiling
              else engine_ceiling(settings, bodies, args.duration_s))
    if args.overload:
        port = free_port()
        with _server(_service_command(args, port, "--max-queue", str(args.overload_queue),
                                      *shlex.split(args.service_args)),
                     port, "/readyz", "service (overload)",
                     args.out / "service-overload.log") as overloaded:
            result = median_run([asyncio.run(_measure_service(
                overloaded.url, bodies, args.overload, args.duration_s, {},
                pid=overloaded.pid)) for _ in range(args.repeat)])
        result.target = "service-overload"
        result.extra = {**result.extra, "max_queue": args.overload_queue}
        results.append(result)

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__},
        "model": str(args.model), "service_args": args.service_args,
        "images": {"count": len(bodies), "source": str(args.images or "synthetic"),
                   "size": None if args.images else f"{args.width}x{args.height}"},
        "duration_s": args.duration_s, "repeat": args.repeat,
        "single_inprocess_call_ms": None if single_ms is None else round(single_ms, 2),
        "idle_rss_mb": idle_rss_mb,
        "service_engine": service_engine,
        "engine_ceiling": engine.as_dict() if engine else None,
        "ratios": throughput_ratios(results, engine.best if engine else None),
        "results": [r.as_dict() for r in results],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = write_plot(results, args.out / "bench.png")
    print(_table(results))
    if single_ms is not None:
        print(f"single in-process call: {single_ms:.1f} ms")
    print(f"idle RSS {idle_rss_mb} MB")
    if engine:
        print(f"engine ceiling (decoded images, images/s by batch): "
              f"{json.dumps(engine.images_per_s)}; best: batch {engine.best_batch}")
    for r in results:
        if r.target == "service" and r.http_ms:
            print(f"HTTP adds to the service's own time at c={r.load:g}: p50 {r.http_ms['p50']} "
                  f"ms, p99 {r.http_ms['p99']} ms")
    print("ratios: " + json.dumps(report["ratios"]))
    print(f"wrote {args.out / 'bench.json'} and {plot}" if plot else
          f"wrote {args.out / 'bench.json'}; no plot: {INSTALL_HINT}")
