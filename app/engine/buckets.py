"""Fixed-shape batch buckets: which batch sizes a model runs at, and how a batch fits one.

On a GPU, onnxruntime's CUDA convolutions keep their cuDNN plan for the last input shape only,
so a session that sees a new batch size re-plans (seconds on D-FINE-L). A session per bucket
only ever sees one shape: a batch of n runs in the smallest bucket >= n, padded.
"""

from __future__ import annotations

import bisect

GPU_DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


def parse_buckets(text: str) -> tuple[int, ...] | None:
    """``"auto"`` -> None; ``"1,2,4"`` -> (1, 2, 4), sorted and without repeats."""
    text = text.strip().lower()
    if text == "auto":
        return None
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"batch buckets must be 'auto' or a comma list of sizes, not {text!r}"
                         ) from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 256:
        raise ValueError(f"batch bucket sizes must be within 1..256, not {text!r}")
    return tuple(sizes)


def resolve_buckets(requested: tuple[int, ...] | None, max_batch_size: int, on_cuda: bool,
                    fixed_batch: int | None) -> tuple[int, ...] | None:
    """The buckets to serve with; None: one session for every batch size.

    A model with a fixed batch size has one bucket, its own. ``auto`` gives buckets where the
    CUDA provider runs the model (powers of two up to ``max_batch_size``, and
    ``max_batch_size`` itself), and none elsewhere: a CPU session takes any batch size at no
    cost, and TensorRT builds one engine for a dynamic-batch profile (an engine per bucket
    would multiply its minutes-long builds). Explicit buckets above ``max_batch_size`` are
    dropped; ``max_batch_size`` is added, so that a full batch always has a bucket.
    """
    if fixed_batch is not None:
        return (fixed_batch,)
    if requested is None:
        if not on_cuda:
            return None
        requested = GPU_DEFAULT_BUCKETS
    return tuple(sorted({b for b in requested if b <= max_batch_size} | {max_batch_size}))


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` images."""
    index = bisect.bisect_left(buckets, n)
    if index == len(buckets):
        raise ValueError(f"a batch of {n} is larger than the largest bucket {buckets[-1]}")
    return buckets[index]
