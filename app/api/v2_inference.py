"""The Open Inference Protocol's inference, whatever carries it (REST in app.api.v2_routes,
gRPC in app.api.grpc_service): the parsed request's images as engine jobs, the answers as the
protocol's output tensors, and the model metadata both forms report.

Inputs: BYTES, the encoded image files (what Triton ensemble and DALI clients send), shape [N]
or [N, 1]; or FP32 ``images`` [N, 3, H, W] already preprocessed as the official pipeline does,
with INT64 ``orig_target_sizes`` [N, 2] (width, height; default: the input size). Outputs, in the
official export's layout: ``labels`` INT64 [N, K], ``boxes`` FP32 [N, K, 4] (original pixels,
unclipped), ``scores`` FP32 [N, K], and ``names`` BYTES [N, K], the labels' class names.

An input may lie in a shared-memory region (app.api.shm): each image is then read from it by
its own job, once the request holds its places (a request's places are taken after its jobs
are made), so that what requests hold stays within the places' bound. Outputs asked into a
region are written there (``into_regions``) and answered by name, datatype and shape only.
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from app.api.deps import MAX_DETECTIONS, params_for, tiling_for
from app.api.v2_codec import NUMERIC, InferRequest, Limits, RegionData, Tensor
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.imaging import MAX_SIDE as MAX_TARGET_SIDE
from app.imaging import PreparedImage
from app.labels import label_name
from app.model_repository import parse_version
from app.service import Detector, DetectParams, Official

T = TypeVar("T")
OUTPUTS = ("labels", "boxes", "scores", "names")


@dataclass
class OutputTensor:
    name: str
    datatype: str
    value: np.ndarray | list[list[bytes]]  # numeric, or BYTES rows

    @property
    def shape(self) -> list[int]:
        if isinstance(self.value, np.ndarray):
            return list(self.value.shape)
        return [len(self.value), len(self.value[0]) if self.value else 0]

    def raw(self) -> bytes:
        """The binary tensor extension's (and gRPC's raw_output_contents') bytes: row-major
        little-endian values, or each BYTES element as a 4-byte length and its bytes."""
        if isinstance(self.value, np.ndarray):
            return self.value.astype(self.value.dtype.newbyteorder("<"), copy=False).tobytes()
        return b"".join(struct.pack("<I", len(item)) + item
                        for row in self.value for item in row)

    def json(self) -> dict[str, Any]:
        """The tensor in JSON: shape and flat, row-major data (BYTES as text: class names)."""
        data: list[Any] = (self.value.reshape(-1).tolist() if isinstance(self.value, np.ndarray)
                           else [item.decode() for row in self.value for item in row])
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape,
                "data": data}


def requested_version(text: str | None) -> int | None:
    """The version a path or a gRPC field names: Triton's are strings, ours positive
    integers; any other is a version this server does not have (404)."""
    try:
        return parse_version(text)
    except ValueError as exc:
        raise NotFound(f"unknown version: {exc}") from None


def limits_for(detector: Detector) -> Limits:
    """What one request to this model may carry (app.api.v2_codec.Limits)."""
    settings, info = detector.settings, detector.engine.info
    images = settings.max_batch_images
    return Limits(images, settings.max_upload_bytes,
                  images * (3 * info.input_width * info.input_height + 2))


def model_metadata(detector: Detector, versions: list[int]) -> dict[str, Any]:
    info = detector.engine.info
    return {
        "name": info.name, "versions": [str(v) for v in versions],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "images", "datatype": "FP32",
             "shape": [-1, 3, info.input_height, info.input_width]},
            {"name": "orig_target_sizes", "datatype": "INT64", "shape": [-1, 2]},
        ],
        "outputs": [
            {"name": "labels", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "names", "datatype": "BYTES", "shape": [-1, -1]},
        ],
    }


def check_outputs(wanted: list[str] | None) -> None:
    unknown = set(wanted or ()) - set(OUTPUTS)
    if unknown:
        raise InvalidRequest(f"unknown output(s) {sorted(unknown)}; outputs: {list(OUTPUTS)}")


# The request parameters of tiled inference (the query parameters of /detect), and those that
# shape a tiled answer's detections.
TILING_PARAMETERS = ("tile", "tile_overlap", "tile_merge", "tile_merge_threshold",
                     "tile_merge_metric", "tile_full_image", "tile_class_aware")


def _typed(parameters: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise InvalidRequest(f"parameter {name} must be a {_KIND_NAMES[kind]}, not true/false")
    if not isinstance(value, kind):
        raise InvalidRequest(f"parameter {name} must be a {_KIND_NAMES[kind]}")
    return value


_NUMBER = (int, float)
_KIND_NAMES: dict[Any, str] = {bool: "boolean", str: "string", _NUMBER: "number",
                               (str, int): "string or integer", int: "integer"}


def tiled_params(parameters: dict[str, Any], detector: Detector) -> DetectParams | None:
    """The detection parameters of a tiled request (its parameters over the model's tiling
    defaults), None for an untiled one. A tiled image is answered with /detect's detections
    (``score_threshold``, ``max_detections``: the model's settings unless given)."""
    if not any(name in parameters for name in TILING_PARAMETERS) and (
            detector.default_tiling is None):
        return None
    tiling = tiling_for(
        detector, _typed(parameters, "tile", (str, int)),
        _typed(parameters, "tile_overlap", _NUMBER), _typed(parameters, "tile_merge", str),
        _typed(parameters, "tile_merge_threshold", _NUMBER),
        _typed(parameters, "tile_merge_metric", str),
        _typed(parameters, "tile_full_image", bool), _typed(parameters, "tile_class_aware", bool))
    if tiling is None:
        return None
    threshold = _typed(parameters, "score_threshold", _NUMBER)
    count = _typed(parameters, "max_detections", int)
    if threshold is not None and not 0 <= threshold <= 1:
        raise InvalidRequest("parameter score_threshold must be from 0 to 1")
    if count is not None and not 1 <= count <= MAX_DETECTIONS:
        raise InvalidRequest(f"parameter max_detections must be from 1 to {MAX_DETECTIONS}")
    return params_for(detector, score_threshold=threshold, max_detections=count,
                      tiling=tiling)


def jobs(parsed: InferRequest, detector: Detector
          ) -> list[Callable[[], Coroutine[Any, Any, Official]]]:
    """One engine submission per image (started later), from encoded files or from
    preprocessed tensors."""
    limit = detector.settings.max_batch_images
    files = [t for t in parsed.inputs.values() if t.datatype == "BYTES"]
    params = tiled_params(parsed.parameters, detector)
    if files:
        images = _files(files[0], limits_for(detector))
        if not 0 < len(images) <= limit:
            raise InvalidRequest(f"send 1 to {limit} images; got {len(images)}")
        if params is not None:
            # One image at a time, as /detect/batch runs tiled images: each takes its tiles'
            # places while it runs.
            turn = asyncio.Lock()
            tiled = functools.partial(detector.infer_tiled, params=params)
            return [functools.partial(_in_turn, turn, _file_job, data, tiled)
                    for data in images]
        return [functools.partial(detector.infer, data=data)
                if isinstance(data, memoryview) else
                functools.partial(_file_job, data, detector.infer) for data in images]
    if params is not None and any(name in parsed.parameters for name in TILING_PARAMETERS):
        raise InvalidRequest("tiling needs the image files (a BYTES input), not tensors "
                             "preprocessed already")
    tensor = parsed.inputs.get("images")
    info = detector.engine.info
    if tensor is None or tensor.datatype != "FP32":
        raise InvalidRequest("send the images as a BYTES input, or as FP32 'images'")
    image = (3, info.input_height, info.input_width)
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != image:
        raise InvalidRequest(f"images must be [N, 3, {info.input_height}, {info.input_width}]")
    count = tensor.shape[0]
    if not 0 < count <= limit:
        raise InvalidRequest(f"send 1 to {limit} images; got {count}")
    sizes = parsed.inputs.get("orig_target_sizes")
    if sizes is None:
        wh = np.tile([info.input_width, info.input_height], (count, 1))
    else:
        wh = _array(sizes).astype(np.int64, copy=False)
        if (wh.shape != (count, 2) or (wh <= 0).any()
                or (wh > MAX_TARGET_SIDE).any()):
            raise InvalidRequest(f"orig_target_sizes must be [N, 2] (width, height), each "
                                 f"1 to {MAX_TARGET_SIDE}")
    if isinstance(tensor.value, RegionData):
        # Each image read by its job, into an array of its own.
        each = 4 * int(np.prod(image))
        region = tensor.value
        return [functools.partial(_tensor_job, detector, RegionData(
            region.regions, region.region, region.offset + k * each, each), image,
            int(w), int(h)) for k, (w, h) in enumerate(wh)]
    pixels = np.asarray(tensor.value, np.float32)
    if not np.isfinite(pixels).all():
        raise InvalidRequest("images must be finite numbers (no NaN or infinity)")
    return [functools.partial(detector.infer, prepared=PreparedImage(
        np.ascontiguousarray(p), int(w), int(h), (int(w), int(h))))
        for p, (w, h) in zip(pixels, wh)]


def _files(tensor: Tensor, limits: Limits) -> list[memoryview] | list[RegionData]:
    """A BYTES input's elements: views into the request, or where each lies in its region
    (its 4-byte lengths read here, the files by their jobs)."""
    if not isinstance(tensor.value, RegionData):
        assert isinstance(tensor.value, list)
        return tensor.value
    region, name = tensor.value, tensor.name[:64]
    count = int(np.prod(tensor.shape))
    elements, at = [], 0
    for _ in range(count):
        if at + 4 > region.byte_size:
            raise InvalidRequest(f"input {name}: a BYTES element's length is cut short")
        (length,) = struct.unpack("<I", region.read(at, 4))
        at += 4
        if length > limits.max_image_bytes:
            raise PayloadTooLarge(f"input {name}: an image is {length} bytes; the limit is "
                                  f"{limits.max_image_bytes} bytes")
        if at + length > region.byte_size:
            raise InvalidRequest(f"input {name}: a BYTES element runs past its data")
        elements.append(RegionData(region.regions, region.region, region.offset + at, length))
        at += length
    if at != region.byte_size:
        raise InvalidRequest(f"input {name}: {count} BYTES elements fill {at} of its "
                             f"shared_memory_byte_size {region.byte_size}")
    return elements


def _array(tensor: Tensor) -> np.ndarray:
    """A small numeric input (orig_target_sizes) as an array, read now if in a region."""
    if isinstance(tensor.value, RegionData):
        dtype = NUMERIC[tensor.datatype]  # checked when parsed
        return np.frombuffer(tensor.value.read(), dtype).reshape(tensor.shape)
    return np.asarray(tensor.value)


async def _file_job(source: memoryview | RegionData,
                    run: Callable[[memoryview], Awaitable[T]]) -> T:
    """``run`` on an image file, read from its region first (off the event loop)."""
    if isinstance(source, RegionData):
        source = memoryview(await asyncio.to_thread(source.read))
    return await run(source)


async def _tensor_job(detector: Detector, source: RegionData, shape: tuple[int, ...],
                      width: int, height: int) -> Official:
    pixels = await asyncio.to_thread(_pixels, source, shape)
    return await detector.infer(prepared=PreparedImage(pixels, width, height, (width, height)))


def _pixels(source: RegionData, shape: tuple[int, ...]) -> np.ndarray:
    pixels = np.frombuffer(source.read(), "<f4").reshape(shape)
    if not np.isfinite(pixels).all():
        raise InvalidRequest("images must be finite numbers (no NaN or infinity)")
    return pixels


def into_regions(tensors: list[OutputTensor], parsed: InferRequest) -> set[str]:
    """Write the outputs asked into shared memory there; their names. BYTES are written as
    the binary extension's (a 4-byte length, then the bytes)."""
    written = set()
    for tensor in tensors:
        target = parsed.regions.get(tensor.name)
        if target is None:
            continue
        raw = tensor.raw()
        if len(raw) > target.byte_size:
            raise InvalidRequest(f"shared memory size specified with the request for output "
                                 f"{tensor.name!r} ({target.byte_size} bytes) should be at "
                                 f"least {len(raw)} bytes")
        target.regions.write(target.region, target.offset, raw)
        written.add(tensor.name)
    return written


def rest_outputs(tensors: list[OutputTensor], parsed: InferRequest
                 ) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The REST answer's outputs, and the binary data after its JSON (in their order): each
    in JSON, in the binary extension, or written into a shared-memory region (then only its
    name, datatype and shape)."""
    written = into_regions(tensors, parsed)
    outputs: list[dict[str, Any]] = []
    blobs = []
    for tensor in tensors:
        if tensor.name in written:
            outputs.append({"name": tensor.name, "datatype": tensor.datatype,
                            "shape": tensor.shape})
        elif parsed.wants_binary(tensor.name):
            raw = tensor.raw()
            blobs.append(raw)
            outputs.append({"name": tensor.name, "datatype": tensor.datatype,
                            "shape": tensor.shape,
                            "parameters": {"binary_data_size": len(raw)}})
        else:
            outputs.append(tensor.json())
    return outputs, blobs


def result_tensors(results: list[Official], wanted: list[str] | None, detector: Detector
                   ) -> list[OutputTensor]:
    """The outputs asked for (default: all), in the official layout, one row per image.
    Rows of different lengths (tiled answers) are padded to the longest: label -1, score 0,
    box 0, name empty."""
    results = _padded(results)
    labels = np.stack([r.labels for r in results]).astype(np.int64)
    names = detector.engine.info.labels
    made = {
        "labels": lambda: OutputTensor("labels", "INT64", labels),
        "boxes": lambda: OutputTensor("boxes", "FP32", np.stack(
            [r.boxes for r in results]).astype(np.float32)),
        "scores": lambda: OutputTensor("scores", "FP32", np.stack(
            [r.scores for r in results]).astype(np.float32)),
        "names": lambda: OutputTensor("names", "BYTES", [
            [label_name(names, int(v)).encode() if v >= 0 else b"" for v in row]
            for row in labels]),
    }
    return [made[name]() for name in (wanted or OUTPUTS)]


async def _in_turn(turn: asyncio.Lock, work: Callable[..., Awaitable[T]], *args: Any) -> T:
    async with turn:
        return await work(*args)


def _padded(results: list[Official]) -> list[Official]:
    longest = max(len(r.labels) for r in results)
    if all(len(r.labels) == longest for r in results):
        return results
    return [Official(
        np.concatenate([r.labels, np.full(longest - len(r.labels), -1, np.int64)]),
        np.concatenate([r.boxes.reshape(-1, 4),
                        np.zeros((longest - len(r.labels), 4), np.float32)]),
        np.concatenate([r.scores, np.zeros(longest - len(r.labels), np.float32)]))
        for r in results]
