"""A bucket's runner: one onnxruntime session that only ever runs batches of one size, through
inputs and outputs bound once, on a thread of its own.

Buffers are allocated when the runner is made and reused by every run: host arrays that the
batch is stacked into (rows past the batch keep earlier, valid data: their results are
dropped), and, on a GPU, device tensors at fixed addresses, which CUDA graphs need. Outputs are
bound by name, never by position, with the shapes onnxruntime reports for the fixed batch.

Every run, warm-up included, happens on the runner's own thread: the CUDA provider keeps its
captured graph per thread (cuda_execution_provider.h, PerThreadContext), so a graph captured
on one thread would be captured again, unguarded, by the first run on another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from app.threads import name_os_thread

Device = Literal["cpu", "cuda"]
Rows = npt.NDArray[Any] | Sequence[npt.NDArray[Any]]  # (n, ...) or n arrays of (...)
T = TypeVar("T")

NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(double)": np.float64, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # with the bucket's batch size first
    dtype: type[np.generic]


def output_specs(session: ort.InferenceSession, names: list[str],
                 inputs: list[TensorSpec]) -> list[TensorSpec]:
    """The outputs' shapes and types as the session reports them: with the batch axis fixed,
    onnxruntime infers every output dimension (the export's "Modlabels_dim_1" becomes 300).
    Where it can't (an exporter's data-dependent dimension), one run on zeros tells."""
    by_name = {o.name: o for o in session.get_outputs()}
    shapes = [by_name[name].shape for name in names]
    if all(isinstance(d, int) for shape in shapes for d in shape):
        return [TensorSpec(name, tuple(shape), NUMPY_TYPES[by_name[name].type])
                for name, shape in zip(names, shapes)]
    feeds = {spec.name: np.ones(spec.shape, spec.dtype) for spec in inputs}
    arrays = session.run(names, feeds)
    return [TensorSpec(name, tuple(array.shape), array.dtype.type)
            for name, array in zip(names, arrays)]


class BucketRunner:
    """Runs batches of up to ``size`` images in ``session`` at exactly ``size``."""

    def __init__(self, session: ort.InferenceSession, size: int, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], device: Device, device_id: int = 0,
                 fill: Mapping[str, npt.NDArray[Any]] | None = None) -> None:
        """``fill``: a valid first row per input (the padding rows start as copies of it)."""
        self.session = session
        self.size = size
        self.device = device
        self.output_names = [spec.name for spec in outputs]
        # One thread, so one run at a time (the buffers are shared) and every run on the
        # thread that captured the graph.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"bucket{size}",
                                          initializer=name_os_thread)
        self._staging: dict[str, npt.NDArray[Any]] = {}
        self._device_inputs: dict[str, ort.OrtValue] = {}
        self._outputs: dict[str, ort.OrtValue] = {}
        self._binding = session.io_binding()
        for spec in inputs:
            staging = np.zeros(spec.shape, spec.dtype)
            if fill and spec.name in fill:
                staging[:] = fill[spec.name]
            self._staging[spec.name] = staging
            if device == "cpu":  # the OrtValue shares the array's memory: no copy per run
                value = ort.OrtValue.ortvalue_from_numpy(staging, "cpu")
            else:
                value = ort.OrtValue.ortvalue_from_numpy(staging, device, device_id)
                self._device_inputs[spec.name] = value
            self._binding.bind_ortvalue_input(spec.name, value)
        for spec in outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(spec.shape), spec.dtype,
                                                              device, device_id)
            self._outputs[spec.name] = value
            self._binding.bind_ortvalue_output(spec.name, value)

    def on_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the runner's thread and wait for it."""
        return self._thread.submit(work).result()

    def run(self, feeds: Mapping[str, Rows]) -> dict[str, npt.NDArray[Any]]:
        """``feeds``: name -> n rows (an array or a list of arrays), n <= size. Returns
        name -> (n, ...) host arrays."""
        return self.on_thread(lambda: self._run(feeds))

    def time_run(self, feeds: Mapping[str, Rows], repeats: int) -> float:
        """The median seconds of ``repeats`` runs of ``feeds``, timed on the runner's thread."""

        def timed() -> float:
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                self._run(feeds)
                times.append(time.perf_counter() - started)
            return sorted(times)[len(times) // 2]

        return self.on_thread(timed)

    def _run(self, feeds: Mapping[str, Rows]) -> dict[str, npt.NDArray[Any]]:
        n = len(next(iter(feeds.values())))
        if n > self.size:
            raise ValueError(f"a batch of {n} does not fit the bucket of {self.size}")
        for name, rows in feeds.items():
            staging = self._staging[name]
            if isinstance(rows, np.ndarray):
                staging[:n] = rows
            else:  # each image straight into its row: no batch array in between
                np.stack(rows, out=staging[:n])
        for name, device_value in self._device_inputs.items():
            device_value.update_inplace(self._staging[name])  # same address every run
        self.session.run_with_iobinding(self._binding)
        # numpy() of a CPU value is a view of the bound buffer, which the next run
        # overwrites; of a device value, a fresh host copy.
        return {name: value.numpy()[:n].copy() if self.device == "cpu"
                else value.numpy()[:n] for name, value in self._outputs.items()}

    def close(self) -> None:
        self._thread.shutdown(wait=False)
