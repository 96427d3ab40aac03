"""What one image's decode and preprocessing costs in this process, on one thread, with the
service's own code (``Detector.prepare``): the part of a request's CPU the front end cannot
save. ``dfine-serve bench --wrk`` sets the service's CPU per request beside it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine.instant import InstantEngine
from app.metrics import Metrics
from app.service import Detector

WARMUP = 10


def settings_for(model: Path, env: Mapping[str, str]) -> Settings:
    """The settings a target runs with, from its DFINE_* environment (e.g. PREPROCESS)."""
    chosen: dict[str, Any] = {
        name[len("DFINE_"):].lower(): value for name, value in env.items()
        if name.startswith("DFINE_") and name[len("DFINE_"):].lower() in Settings.model_fields}
    chosen.update(model_path=model, instant_engine=True, grpc_port=0)
    return Settings(**chosen)


def preprocess_ms(settings: Settings, body: bytes, repeats: int = 200, rounds: int = 5
                  ) -> float:
    """CPU milliseconds (this process's, so one thread's work here) of one ``prepare``: the
    least of ``rounds`` rounds' means, as a shared machine only ever adds to it."""
    detector = Detector(InstantEngine.load(settings), settings,
                        Metrics().for_version("bench", 1))
    for _ in range(WARMUP):
        detector.prepare(body)
    means = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(max(1, repeats // rounds)):
            detector.prepare(body)
        means.append((time.process_time() - started) / max(1, repeats // rounds))
    return round(min(means) * 1000, 3)
