"""An engine that answers at once, for benchmarks only (INSTANT_ENGINE): the service's front end
(HTTP, upload, decode and resize, batching, postprocess, the response) measured with the model
taken out, so that a bench can tell whether a small model on a big GPU is bounded by the front
end rather than the engine. It reads the model's facts (input size, layout, classes) and opens
no session; every image comes back with 300 detections of score 0: none above a threshold."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from app.config import Settings
from app.engine import providers as prov
from app.engine.engine import TOP_K, Detections, OnnxEngine
from app.engine.model import inspect_model
from app.engine.runner import Rows
from app.engine.sessions import parallelism


class InstantEngine(OnnxEngine):
    @classmethod
    def load(cls, settings: Settings, factory: Any = None,
             name: str | None = None) -> InstantEngine:
        info = inspect_model(settings.model_path, settings.labels_path, name,
                             settings.input_size_wh)
        # Batching and decode workers as on a GPU, where the front end is the question.
        parallel = parallelism(settings, [prov.CUDA], info.fixed_batch)
        return cls(replace(info, providers=["instant"], providers_asked=["instant"],
                           precision=settings.precision), parallel)

    def run(self, images: Rows, sizes_wh: npt.NDArray[np.int64],
            may_use_all_cores: bool = True) -> Detections:
        n = len(images)
        return Detections(np.zeros((n, TOP_K), np.int64), np.zeros((n, TOP_K, 4), np.float32),
                          np.zeros((n, TOP_K), np.float32))

    def warm_up(self) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {**super().report(), "memory_kind": "host", "instant": True}


def load_engine(settings: Settings, name: str | None = None) -> OnnxEngine:
    """The engine the settings ask for: onnxruntime's, or the instant one of benchmarks;
    served as ``name`` (default: the file's stem)."""
    if settings.instant_engine:
        return InstantEngine.load(settings, name=name)
    return OnnxEngine.load(settings, name=name)
