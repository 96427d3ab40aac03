"""The in-process ceilings. ``ceiling_loop``: the service's own decode, preprocess, batching,
engine and postprocess code driven directly, with no HTTP, at the same concurrency.
``engine_ceiling``: the engine alone on already decoded images, at each batch size it runs."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.bench.load import Progress
from app.bench.stats import Sample
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import ServiceError
from app.metrics import Metrics
from app.service import Detector, DetectParams


@dataclass
class CeilingRun:
    samples: list[Sample]
    elapsed_s: float
    avg_batch_size: float
    cpu_s: float  # this process's CPU during the loop (no HTTP client or server to count)


async def ceiling_loop(settings: Settings, bodies: list[bytes], concurrency: int,
                       duration_s: float, progress: Progress | None = None) -> CeilingRun:
    """Closed loop on a Detector built from ``settings``."""
    engine = await asyncio.to_thread(OnnxEngine.load, settings)
    metrics = Metrics()
    detector = Detector(engine, settings, metrics.for_version(engine.info.name, 1))
    await asyncio.to_thread(detector.warm_up)
    detector.start()
    params = DetectParams(settings.score_threshold, settings.max_detections)
    samples: list[Sample] = []
    cpu_started = time.process_time()  # every thread of this process: engine, decode, loop
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client(offset: int) -> None:
        index = offset
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await detector.detect(bodies[index % len(bodies)], params)
                status = 200
            except ServiceError as exc:
                status = exc.status
            samples.append(Sample(status, time.perf_counter() - t0))
            index += concurrency
            if progress:
                progress(1)

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    await detector.stop()
    images = metrics.registry.get_sample_value("dfine_images_total") or 0.0
    batches = metrics.registry.get_sample_value("dfine_batch_size_count") or 0.0
    return CeilingRun(samples, elapsed, (images / batches) if batches else 1.0, cpu_s)


async def single_call_ms(settings: Settings, body: bytes, repeats: int = 50) -> float:
    """Median time of one in-process detection of one image on an idle engine."""
    engine = await asyncio.to_thread(OnnxEngine.load, settings)
    detector = Detector(engine, settings, Metrics().for_version(engine.info.name, 1))
    await asyncio.to_thread(detector.warm_up)
    detector.start()
    params = DetectParams(settings.score_threshold, settings.max_detections)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await detector.detect(body, params)
        times.append(time.perf_counter() - t0)
    await detector.stop()
    times.sort()
    return times[len(times) // 2] * 1000


@dataclass
class EngineCeiling:
    """The engine alone, images already decoded: images/s at each batch size it runs."""

    images_per_s: dict[int, float]

    @property
    def best_batch(self) -> int:
        return max(self.images_per_s, key=lambda size: self.images_per_s[size])

    @property
    def best(self) -> float:
        return self.images_per_s[self.best_batch]

    def as_dict(self) -> dict[str, Any]:
        return {"images_per_s_by_batch": {str(k): v for k, v in self.images_per_s.items()},
                "best_batch": self.best_batch, "images_per_s": self.best}


def engine_ceiling(settings: Settings, bodies: list[bytes], duration_s: float) -> EngineCeiling:
    """Each batch size the engine runs (its buckets; without buckets, 1 and its largest batch)
    for ``duration_s`` in all, with as many runs in flight as the service has instances."""
    engine = OnnxEngine.load(settings)
    engine.warm_up()
    # For its decode and resize only.
    detector = Detector(engine, settings, Metrics().for_version(engine.info.name, 1))
    prepared = [detector.prepare(body) for body in bodies]
    sizes = engine.buckets or tuple(sorted({1, engine.parallel.max_batch_size}))
    instances = engine.parallel.instances
    found: dict[int, float] = {}
    for size in sizes:
        chosen = [prepared[k % len(prepared)] for k in range(size)]
        images = [p.pixels for p in chosen]  # as the service hands them over
        sizes_wh = np.asarray([p.target_size_wh for p in chosen], np.int64)
        engine.run(images, sizes_wh)  # untimed: a first run of a shape pays for its setup
        stop_at = time.perf_counter() + duration_s / len(sizes)
        started = time.perf_counter()
        with ThreadPoolExecutor(instances) as pool:
            futures = [pool.submit(_run_until, engine, images, sizes_wh, stop_at,
                                   instances == 1) for _ in range(instances)]
            runs = sum(f.result() for f in futures)
        found[size] = round(runs * size / (time.perf_counter() - started), 2)
    return EngineCeiling(found)


def _run_until(engine: OnnxEngine, images: list[np.ndarray], sizes_wh: np.ndarray,
               stop_at: float, alone: bool) -> int:
    runs = 0
    while time.perf_counter() < stop_at:
        engine.run(images, sizes_wh, may_use_all_cores=alone)
        runs += 1
    return runs
