"""The in-process ceiling: the service's own decode, preprocess, batching, engine and
postprocess code driven directly, with no HTTP, at the same concurrency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from app.bench.load import Progress
from app.bench.stats import Sample
from app.config import Settings
from app.engine.session import OnnxEngine
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
    detector = Detector(engine, settings, metrics)
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
    detector = Detector(engine, settings, Metrics())
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
