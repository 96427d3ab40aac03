"""Shared-memory pools of model-ready tensors: a front end writes an image into a slot, the
engine process reads its batch from the slots.

A pool is an anonymous memory file (memfd) mapped by both processes: its descriptor is handed
over the channel, so it has no name to clean up, is not bounded by /dev/shm's size (64 MB in a
default container), and its memory goes when the last process that maps it lets go.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import deque

import numpy as np
import numpy.typing as npt

Shape = tuple[int, ...]
DTYPE = np.float32


def _slot_bytes(shape: Shape) -> int:
    # Each slot starts on its own page: no two slots share one, and views stay aligned.
    size = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


class SlotPool:
    """``count`` slots of ``shape`` (float32) in one mapping. The front end creates it
    (``create``) and takes and gives back slots; the engine maps the same memory from its
    descriptor (``attach``) and only reads views."""

    def __init__(self, fd: int, shape: Shape, count: int) -> None:
        self.fd, self.shape, self.count = fd, shape, count
        self.slot_bytes = _slot_bytes(shape)
        self._map = mmap.mmap(fd, self.slot_bytes * count)
        self._address = np.frombuffer(self._map, np.uint8, count=1).ctypes.data
        self._free: deque[int] = deque(range(count))

    @classmethod
    def create(cls, name: str, shape: Shape, count: int) -> SlotPool:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, _slot_bytes(shape) * count)
        return cls(fd, shape, count)

    @classmethod
    def attach(cls, fd: int, shape: Shape, count: int) -> SlotPool:
        return cls(fd, shape, count)

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int | None:
        """A free slot's index, or None when every slot is taken."""
        return self._free.popleft() if self._free else None

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def view(self, slot: int) -> npt.NDArray[np.float32]:
        if not 0 <= slot < self.count:
            raise IndexError(f"slot {slot} of a pool of {self.count}")
        return np.ndarray(self.shape, DTYPE, self._map, offset=slot * self.slot_bytes)

    def slot_of(self, array: npt.NDArray[np.float32]) -> int | None:
        """The slot ``array`` is the view of, or None if it is not one of this pool's."""
        offset = array.ctypes.data - self._address
        slot, rest = divmod(offset, self.slot_bytes)
        if rest or not 0 <= slot < self.count or array.shape != self.shape:
            return None
        return slot

    def close(self) -> None:
        """Let go of the mapping and the descriptor (once; a view that still lives keeps the
        mapping until it goes)."""
        if self.fd < 0:
            return
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
        self.fd = -1
