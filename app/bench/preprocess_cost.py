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


def preprocess_ms(settings: Settings, body: bytes, repeats: int = 200) -> float:
    """CPU milliseconds (this process's, so one thread's work here) of one ``prepare``."""
    detector = Detector(InstantEngine.load(settings), settings,
                        Metrics().for_version("bench", 1))
    for _ in range(WARMUP):
        detector.prepare(body)
    started = time.process_time()
    for _ in range(repeats):
        detector.prepare(body)
    return round((time.process_time() - started) / repeats * 1000, 3)
