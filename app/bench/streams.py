"""``dfine-serve bench-streams``: how many live camera streams the service keeps up with.

The bench serves N synthetic cameras itself (MJPEG over HTTP: 640x480 JPEGs of moving shapes,
paced at --fps, from a thread of this process), starts the service as a user would (its
defaults, STREAM_SOURCES allowing loopback, MAX_STREAMS enough for the sweep) and, for each N
of --streams, creates N streams (tracking on), lets them warm up, then measures a window: each
stream's frames out per second and its drops (its counters), the frames' lag p50 and p99 (the
service's histogram, interpolated as Prometheus' histogram_quantile does) and the service's CPU
per processed frame, per thread group too (/proc, every process of it). A stream keeps up when
it publishes at least 0.9 of the frames its camera sends (KEEPS_UP_SHARE).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from app.bench.cli import _server, _service_command, free_port
from app.bench.stats import metric_value
from app.bench.wrk import (
    EXITED_THREADS,
    ThreadGroup,
    ThreadUse,
    cpu_used,
    group_threads,
    mean_batch_size,
    snapshot,
)
from app.config import DEFAULT_MODEL_PATH

KEEPS_UP_SHARE = 0.9  # of the source's fps, for every stream
LOOP_FRAMES = 100  # the cameras' loop: 10 s at 10 fps, shapes moving ~10 px a frame
LAG_HISTOGRAM = "dfine_stream_frame_lag_seconds"
START_TIMEOUT_S = 60.0  # a stream created until it runs; deleted streams until they are gone
HTTP_TIMEOUT_S = 30.0
_CAMERA_PATH = re.compile(r"^/cam/(\d+)$")
_LE = re.compile(r'le="([^"]+)"')


# --- the cameras ------------------------------------------------------------------------------


def moving_shapes(count: int = LOOP_FRAMES, width: int = 640, height: int = 480
                  ) -> list[bytes]:
    """``count`` JPEGs of a circle, a rectangle and a triangle (the shipped model's classes),
    each going back and forth in its own lane on a textured gradient: a seamless loop."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array([95, 85, 70], np.float32), np.array([150, 145, 135], np.float32)
    background = np.broadcast_to(top + (bottom - top) * ys, (height, width, 3)).copy()
    background += np.random.default_rng(27).normal(0.0, 3.0, background.shape).astype(np.float32)
    background = np.clip(background, 0, 255).astype(np.uint8)
    unit = min(width, height)
    frames = []
    for k in range(count):
        image = background.copy()
        for lane, (phase, colour) in enumerate(((0.0, (40, 40, 220)), (0.33, (200, 120, 20)),
                                                (0.66, (30, 200, 230)))):
            half = int(unit * 0.12)
            t = (k / count + phase) % 1.0
            x = int(half + 8 + (width - 2 * half - 16) * (2 * t if t < 0.5 else 2 - 2 * t))
            y = int(height * (0.2 + 0.3 * lane))
            if lane == 0:
                cv2.circle(image, (x, y), half, colour, -1, cv2.LINE_AA)
            elif lane == 1:
                cv2.rectangle(image, (x - half, y - half * 2 // 3), (x + half, y + half * 2 // 3),
                              colour, -1)
            else:
                points = np.asarray([[x, y - half], [x - half, y + half // 2],
                                     [x + half, y + half // 2]], np.int32)
                cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        frames.append(data.tobytes())
    return frames


class _CameraServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, frames: list[bytes], fps: float, cameras: int) -> None:
        super().__init__(("127.0.0.1", 0), _Camera)
        self.frames, self.fps, self.cameras = frames, fps, cameras
        self.stopping = threading.Event()


class _Camera(BaseHTTPRequestHandler):
    server: _CameraServer

    def do_GET(self) -> None:
        match = _CAMERA_PATH.match(self.path)
        if match is None or int(match[1]) >= self.server.cameras:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        frames, step, stopping = self.server.frames, 1 / self.server.fps, self.server.stopping
        index = int(match[1]) * 17  # the cameras show different moments of the loop
        due = time.monotonic()
        while not stopping.is_set():
            jpeg = frames[index % len(frames)]
            index += 1
            try:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
            except OSError:
                return  # the stream was deleted
            due += step
            if due < time.monotonic() - step:
                due = time.monotonic()  # late (a busy machine): a camera sends no burst
            stopping.wait(max(0.0, due - time.monotonic()))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def cameras(count: int, fps: float, frames: list[bytes]) -> Iterator[str]:
    """``count`` live MJPEG cameras on loopback, /cam/0 .. /cam/{count-1}; yields the base
    URL."""
    server = _CameraServer(frames, fps, count)
    thread = threading.Thread(target=server.serve_forever, name="bench-cameras", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


# --- what is computed ---------------------------------------------------------------------------


def histogram_buckets(exposition: str, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound, summed over its other labels."""
    buckets: dict[float, float] = {}
    prefix = name + "_bucket{"
    for line in exposition.splitlines():
        if line.startswith(prefix) and (le := _LE.search(line)) is not None:
            bound = float(le[1])
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_deltas(before: Mapping[float, float], after: Mapping[float, float]
                  ) -> dict[float, float]:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``buckets`` (upper bound: count, +Inf
    included): linear within the bucket the rank falls in; the highest finite bound when it
    falls in +Inf's; None without observations."""
    bounds = sorted(buckets)
    if len(bounds) < 2 or not math.isinf(bounds[-1]) or not 0 <= q <= 1:
        return None
    counts, highest = [], 0.0
    for bound in bounds:  # as Prometheus does: a count below an earlier one is taken as it
        highest = max(highest, buckets[bound])
        counts.append(highest)
    if counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    b = next(i for i, count in enumerate(counts) if count >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, count = 0.0, counts[b]
    if b > 0:
        start, count, rank = bounds[b - 1], count - counts[b - 1], rank - counts[b - 1]
    if count <= 0:  # q = 0 over an empty first bucket
        return start
    return start + (bounds[b] - start) * (rank / count)


def keeps_up(fps_out: Sequence[float], source_fps: float, share: float = KEEPS_UP_SHARE
             ) -> bool:
    """Every stream published at least ``share`` of its source's frames a second."""
    return bool(fps_out) and all(f >= share * source_fps for f in fps_out)


def thread_group(role: str) -> str:
    """wrk's thread roles, with the per-stream readers and the unnamed threads pooled: those
    are onnxruntime's pool threads (the all-cores session a lone run takes, which spin while
    idle) and asyncio's executor (tracking), which name no OS thread."""
    if role.startswith("stream-"):
        return "stream-* (readers)"
    if role.startswith("tid "):
        return "unnamed (onnxruntime's pool, tracking)"
    return role


def pooled(uses: list[ThreadUse]) -> list[ThreadUse]:
    return [dataclasses.replace(use, role=thread_group(use.role))
            if use.role != EXITED_THREADS else use for use in uses]


@dataclass
class StepResult:
    streams: int
    window_s: float
    fps_out: list[float]  # per stream, frames published a second over the window
    fps_in: list[float]  # per stream, frames the service received a second
    frames_processed: int
    frames_dropped: int
    dropped_pct: float
    lag_p50_s: float | None  # the histogram's, over the window
    lag_p99_s: float | None
    lag_max_gauge_s: float | None  # the largest stream's last-frame lag at the window's end
    cpu_ms_per_frame: float | None  # every process and thread of the service
    avg_batch_size: float | None
    keeps_up: bool
    states: list[str]  # each stream's at the window's end
    threads: list[ThreadGroup] = field(default_factory=list)
    bench_cpu_s: float = 0.0  # this process's (its cameras') over the window: on the same cores
    load_avg_1m: float = 0.0  # the machine's at the window's end: others' work shows here
    cpu_bound_fps: float | None = None  # cores / CPU per frame: the frames a second the
    # service would make with the cores to itself (what a busy shared machine hides)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def table(results: list[StepResult]) -> str:
    lines = ["| streams | fps out min | fps out mean | fps out total | fps in mean | dropped % "
             "| lag p50 ms | lag p99 ms | lag max ms | CPU ms/frame | avg batch | keeps up | "
             "load 1m |", "|---" * 13 + "|"]
    for r in results:
        total = sum(r.fps_out)
        mean = total / len(r.fps_out) if r.fps_out else 0.0
        mean_in = sum(r.fps_in) / len(r.fps_in) if r.fps_in else 0.0
        lines.append(
            f"| {r.streams} | {min(r.fps_out, default=0.0):.1f} | {mean:.1f} | {total:.1f} | "
            f"{mean_in:.1f} | {r.dropped_pct:.1f} | {_ms(r.lag_p50_s)} | {_ms(r.lag_p99_s)} | "
            f"{_ms(r.lag_max_gauge_s)} | "
            f"{'-' if r.cpu_ms_per_frame is None else f'{r.cpu_ms_per_frame:.1f}'} | "
            f"{'-' if r.avg_batch_size is None else r.avg_batch_size} | "
            f"{'yes' if r.keeps_up else 'no'} | {r.load_avg_1m:.1f} |")
    return "\n".join(lines)


def threads_table(results: list[StepResult]) -> str:
    lines = ["| streams | process | threads | count | CPU ms/frame | share % |", "|---" * 6 + "|"]
    for r in results:
        lines.extend(f"| {r.streams} | {g.process.split()[0]} | {g.role} | {g.threads} | "
                     f"{g.cpu_ms_per_request} | {g.share_pct} |"
                     for g in r.threads if g.share_pct >= 0.5)
    return "\n".join(lines)


def largest_keeping_up(results: list[StepResult]) -> int | None:
    return max((r.streams for r in results if r.keeps_up), default=None)


# --- the service ---------------------------------------------------------------------------------


def _call(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=HTTP_TIMEOUT_S) as answer:
        return str(answer.read().decode())


def _wait(what: str, condition: Any, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"dfine-serve bench-streams: {what} within {timeout_s:.0f} s")
        time.sleep(0.2)


def _all_running(url: str, ids: list[str]) -> bool:
    states = {s["id"]: s for s in _call("GET", url + "/streams")["streams"]}
    failed = [f"{i}: {states[i]['reason']}" for i in ids if states[i]["state"] == "failed"]
    if failed:
        raise RuntimeError(f"dfine-serve bench-streams: streams failed: {failed}")
    return all(states[i]["state"] == "running" for i in ids)


def measure(url: str, pid: int, camera_url: str, n: int, args: argparse.Namespace
            ) -> StepResult:
    """N streams created, warmed up, measured over the window, then deleted."""
    ids = [_call("POST", url + "/streams", {"source": f"{camera_url}/cam/{i}", "tracking": True,
                                            "name": f"bench-{i}"})["id"] for i in range(n)]
    try:
        _wait(f"{n} streams running", lambda: _all_running(url, ids))
        time.sleep(args.warmup_s)
        before = _metrics(url)
        started, cpu_before, own_before = time.perf_counter(), snapshot(pid), time.process_time()
        time.sleep(args.seconds)
        cpu_after, window_s = snapshot(pid), time.perf_counter() - started
        own_s = time.process_time() - own_before
        after = _metrics(url)
        states = [_call("GET", f"{url}/streams/{i}")["state"] for i in ids]
    finally:
        for stream_id in ids:
            with contextlib.suppress(OSError):
                _call("DELETE", f"{url}/streams/{stream_id}")
        _wait("the streams deleted", lambda: not {s["id"] for s in _call(
            "GET", url + "/streams")["streams"]} & set(ids))
    result = summarize(n, ids, before, after, cpu_used(cpu_before, cpu_after), window_s,
                       args.fps, states)
    result.bench_cpu_s, result.load_avg_1m = round(own_s, 2), round(os.getloadavg()[0], 2)
    if result.cpu_ms_per_frame:
        cores = len(os.sched_getaffinity(0))
        result.cpu_bound_fps = round(cores * 1000 / result.cpu_ms_per_frame, 1)
    return result


def summarize(n: int, ids: list[str], before: str, after: str, uses: list[ThreadUse],
              window_s: float, source_fps: float, states: list[str]) -> StepResult:
    def delta(selector: str) -> float:
        return metric_value(after, selector) - metric_value(before, selector)

    processed = [delta(f'dfine_stream_frames_processed_total{{stream="{i}"}}') for i in ids]
    received = [delta(f'dfine_stream_frames_received_total{{stream="{i}"}}') for i in ids]
    dropped = sum(delta(f'dfine_stream_frames_dropped_total{{stream="{i}"}}') for i in ids)
    lag = bucket_deltas(histogram_buckets(before, LAG_HISTOGRAM),
                        histogram_buckets(after, LAG_HISTOGRAM))
    gauges = [metric_value(after, f'dfine_stream_lag_seconds{{stream="{i}"}}') for i in ids]
    fps_out = [round(p / window_s, 2) for p in processed]
    frames = int(sum(processed))
    cpu_s = sum(use.cpu_s for use in uses)
    return StepResult(
        streams=n, window_s=round(window_s, 3), fps_out=fps_out,
        fps_in=[round(r / window_s, 2) for r in received], frames_processed=frames,
        frames_dropped=int(dropped),
        dropped_pct=round(100 * dropped / sum(received), 1) if sum(received) else 0.0,
        lag_p50_s=_rounded(histogram_quantile(0.5, lag)),
        lag_p99_s=_rounded(histogram_quantile(0.99, lag)),
        lag_max_gauge_s=_rounded(max(gauges, default=None)),
        cpu_ms_per_frame=round(cpu_s / frames * 1000, 2) if frames else None,
        avg_batch_size=mean_batch_size(before, after),
        keeps_up=keeps_up(fps_out, source_fps), states=states,
        threads=group_threads(pooled(uses), frames))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# --- the run ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfine-serve bench-streams", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="1,2,3,4,6,8",
                   help="the numbers of streams to measure, a comma list")
    p.add_argument("--fps", type=float, default=10.0, help="each camera's frames a second")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--warmup-s", type=float, default=5.0,
                   help="after the streams run, before the window")
    p.add_argument("--seconds", type=float, default=20.0, help="the measured window, per N")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--service-args", default="",
                   help="flags for the service, e.g. '--preprocess fast' (DFINE_* variables "
                        "in this environment pass to it too)")
    p.add_argument("--out", type=Path, default=Path("bench-results/streams.json"))
    return p


def _counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"dfine-serve bench-streams: --streams: {text!r} is not a comma "
                         "list of positive numbers")
    return counts


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    counts = _counts(args.streams)
    if args.fps <= 0 or args.seconds <= 0 or args.warmup_s < 0:
        raise SystemExit("dfine-serve bench-streams: --fps and --seconds must be above 0, "
                         "--warmup-s at least 0")
    frames = moving_shapes(LOOP_FRAMES, args.width, args.height)
    env = {**os.environ, "DFINE_STREAM_SOURCES": "127.0.0.1/32",
           "DFINE_MAX_STREAMS": str(max(counts))}
    port = free_port()
    command = _service_command(args, port,
                               *shlex.split(args.service_args))
    results: list[StepResult] = []
    with contextlib.ExitStack() as stack:
        camera_url = stack.enter_context(cameras(max(counts), args.fps, frames))
        service = stack.enter_context(_server(command, port, "/readyz", "service",
                                              args.out.parent / "streams-service.log", env))
        assert service.pid is not None
        engine = _call("GET", service.url + "/model").get("engine")
        for n in counts:
            print(f"{n} stream(s): {args.warmup_s:g} s warm-up, {args.seconds:g} s measured",
                  file=sys.stderr, flush=True)
            results.append(measure(service.url, service.pid, camera_url, n, args))
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version()},
        "model": str(args.model), "service_args": args.service_args,
        "service_env": {k: v for k, v in env.items() if k.startswith("DFINE_")},
        "service_engine": engine,
        "source": {"fps": args.fps, "width": args.width, "height": args.height,
                   "jpeg_bytes_mean": round(sum(map(len, frames)) / len(frames))},
        "warmup_s": args.warmup_s, "seconds": args.seconds, "keeps_up_share": KEEPS_UP_SHARE,
        "largest_keeping_up": largest_keeping_up(results),
        "results": [r.as_dict() for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print()
    print(threads_table(results))
    best = report["largest_keeping_up"]
    print(f"\n{args.width}x{args.height} streams at {args.fps:g} fps kept up with (every "
          f"stream's fps out >= {KEEPS_UP_SHARE:g} x {args.fps:g}): "
          f"{best if best is not None else 'none of those tried'}. wrote {args.out}")


if __name__ == "__main__":
    main()
