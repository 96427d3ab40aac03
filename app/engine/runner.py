"""A bucket's runner: one onnxruntime session that only ever runs batches of one size, through
inputs and outputs bound once.

Buffers are allocated when the runner is made and reused by every run: host arrays that the
batch is copied into (rows past the batch keep earlier, valid data: their results are dropped),
and, on a GPU, device tensors at fixed addresses, which CUDA graphs need. Outputs are bound
by name, never by position.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # with the bucket's batch size first
    dtype: type[np.generic]


class BucketRunner:
    """Runs batches of up to ``size`` images in ``session`` at exactly ``size``."""

    def __init__(self, session: ort.InferenceSession, size: int, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], device: Device, device_id: int = 0,
                 fill: dict[str, npt.NDArray[Any]] | None = None) -> None:
        """``fill``: a valid first row per input (the padding rows start as copies of it)."""
        self.session = session
        self.size = size
        self.device = device
        self.output_names = [spec.name for spec in outputs]
        self._lock = threading.Lock()  # one run at a time: the buffers are shared
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

    def run(self, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """``feeds``: name -> (n, ...) with n <= size. Returns name -> (n, ...) host arrays."""
        n = next(iter(feeds.values())).shape[0]
        if n > self.size:
            raise ValueError(f"a batch of {n} does not fit the bucket of {self.size}")
        with self._lock:
            for name, value in feeds.items():
                self._staging[name][:n] = value
            for name, device_value in self._device_inputs.items():
                device_value.update_inplace(self._staging[name])  # same address every run
            self.session.run_with_iobinding(self._binding)
            # numpy() of a CPU value is a view of the bound buffer, which the next run
            # overwrites; of a device value, a fresh host copy.
            return {name: value.numpy()[:n].copy() if self.device == "cpu"
                    else value.numpy()[:n] for name, value in self._outputs.items()}
