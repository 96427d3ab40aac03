"""A gRPC ModelInferRequest read from its wire bytes, with what it can cost bounded before
anything is built.

The generated parser (upb) builds every entry of a message: 16 MiB of empty ``inputs`` or of
empty ``bytes_contents`` became millions of objects, gigabytes, and seconds of a thread
holding the GIL. So the protobuf wire format is walked first (records are a tag and a
length; nothing is copied): the request may hold a few tensors, outputs and parameters,
shapes of at most MAX_RANK dimensions, and no more images, numeric values or bytes beside its
tensors than the model takes; the walk stops at the first record past a bound. Only then is it
parsed, and without ``raw_input_contents`` (tritonclient's way of sending tensors): those stay
views into the message, never copied (a decode worker copies its image when it starts). An
input naming a shared-memory region has no raw contents (the others' pair with theirs, in
order, as Triton reads them); an output asked into a region is answered with an empty raw
entry at its place.

Runs in a worker thread: the walk visits at most MAX_REQUEST_RECORDS records beside the images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from app.api.grpc_gate import MAX_OVERHEAD_BYTES
from app.api.shm import Regions
from app.api.v2_codec import (
    MAX_RANK,
    NUMERIC,
    InferRequest,
    Limits,
    RegionData,
    Tensor,
    bytes_elements,
    check_rank,
    input_region,
    numeric_values,
    output_region,
)
from app.api.v2_inference import OutputTensor, into_regions
from app.errors import InvalidRequest, PayloadTooLarge

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# What a request for these models holds: 3 inputs at most, 4 outputs, a few parameters.
MAX_TENSORS = 16  # inputs, requested outputs, raw contents: each
MAX_PARAMETERS = 64  # request or tensor parameters: each
MAX_RECORDS = 256  # fields of one message (or of a contents message, beside its values)
# Records in the whole request beside its images: its fields, each input's, each contents'.
MAX_REQUEST_RECORDS = 1024
MAX_NAME_BYTES = 1024  # a model's name or version
# Requests other than ModelInfer are a name, a version, a flag.
SMALL_MESSAGE_BYTES = 64 * 1024
# Typed numeric contents become numpy arrays this many values at a time, so that the thread
# doing it lets the event loop have the GIL in between.
CONVERT_CHUNK = 1 << 16

# ModelInferRequest's fields, and its tensors' (tritonclient's grpc_service.proto).
MODEL_NAME, MODEL_VERSION = 1, 2
REQUEST_PARAMETERS, REQUEST_INPUTS, REQUEST_OUTPUTS, RAW_CONTENTS = 4, 5, 6, 7
INPUT_SHAPE, INPUT_PARAMETERS, INPUT_CONTENTS = 3, 4, 5
BYTES_CONTENTS = 8
# InferTensorContents' numeric fields: the width of a value (0: a varint).
NUMERIC_WIDTH = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 4, 7: 8}
TYPED_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "INT32": "int_contents",
               "BYTES": "bytes_contents"}


class Record(NamedTuple):
    """One field of a message: its number, wire type, where the record begins (its tag), and
    where its value lies."""

    field: int
    kind: int
    head: int
    start: int
    end: int


def _varint(data: memoryview, at: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= end or shift > 63:
            raise InvalidRequest("the request is not a valid protobuf message")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def records(data: memoryview, start: int, end: int, limit: int, what: str
            ) -> Iterator[Record]:
    """The records of the message in ``data[start:end]`` (field, wire type, where its value
    lies), refused at the first malformed one or at record ``limit + 1``."""
    at, count = start, 0
    while at < end:
        count += 1
        if count > limit:
            raise InvalidRequest(f"{what} has more than {limit} fields")
        head = at
        tag, at = _varint(data, at, end)
        field, kind = tag >> 3, tag & 7
        if kind == VARINT:
            _, stop = _varint(data, at, end)
        elif kind == LENGTH:
            length, at = _varint(data, at, end)
            stop = at + length
        elif kind in (FIXED32, FIXED64):
            stop = at + (4 if kind == FIXED32 else 8)
        else:
            raise InvalidRequest("the request is not a valid protobuf message")
        if field == 0 or stop > end:
            raise InvalidRequest("the request is not a valid protobuf message")
        yield Record(field, kind, head, at, stop)
        at = stop


class _Scan:
    """What the walk found: the tensor bytes it let through, and where raw contents lie."""

    def __init__(self, limits: Limits) -> None:
        self.records_left = MAX_REQUEST_RECORDS + limits.max_images
        self.tensor_bytes = 0
        self.images = 0
        self.files: list[list[memoryview]] = []  # each input's bytes_contents, as views
        self.values = 0
        self.raw: list[Record] = []
        self.kept: list[Record] = []  # every top-level record but raw contents

    def visit(self) -> None:
        """One more record walked: the whole walk has one budget, so that nesting (inputs of
        contents of fields) cannot multiply the per-message bounds."""
        self.records_left -= 1
        if self.records_left < 0:
            raise InvalidRequest(f"the request has more than {MAX_REQUEST_RECORDS} fields "
                                 f"beside its images")


def _count(counts: dict[int, int], field: int, limit: int, what: str) -> None:
    counts[field] = counts.get(field, 0) + 1
    if counts[field] > limit:
        raise InvalidRequest(f"the request has more than {limit} {what}")


def _scan_request(data: memoryview, limits: Limits) -> _Scan:
    scan, counts = _Scan(limits), dict[int, int]()
    bounds = {REQUEST_PARAMETERS: (MAX_PARAMETERS, "parameters"),
              REQUEST_INPUTS: (MAX_TENSORS, "inputs"), REQUEST_OUTPUTS: (MAX_TENSORS, "outputs"),
              RAW_CONTENTS: (MAX_TENSORS, "raw_input_contents")}
    for record in records(data, 0, len(data), MAX_RECORDS, "the request"):
        scan.visit()
        if record.field in bounds:
            _count(counts, record.field, *bounds[record.field])
        if record.field == RAW_CONTENTS and record.kind == LENGTH:
            scan.raw.append(record)
            scan.tensor_bytes += record.end - record.start
            continue
        if record.field == REQUEST_INPUTS and record.kind == LENGTH:
            _scan_input(data, record, limits, scan)
        scan.kept.append(record)
    overhead = len(data) - scan.tensor_bytes
    if overhead > MAX_OVERHEAD_BYTES:
        raise InvalidRequest(f"the request holds {overhead} bytes beside its tensors; at most "
                             f"{MAX_OVERHEAD_BYTES}")
    return scan


def _scan_input(data: memoryview, tensor: Record, limits: Limits, scan: _Scan) -> None:
    counts: dict[int, int] = {}
    shape: list[int] = []
    values = scan.values
    scan.files.append([])
    for record in records(data, tensor.start, tensor.end, MAX_RECORDS, "an input"):
        scan.visit()
        if record.field == INPUT_SHAPE:
            shape += _shape(data, record)
            if len(shape) > MAX_RANK:
                raise InvalidRequest(f"an input has more than {MAX_RANK} dimensions")
        elif record.field == INPUT_PARAMETERS:
            _count(counts, record.field, MAX_PARAMETERS, "parameters in an input")
        elif record.field == INPUT_CONTENTS and record.kind == LENGTH:
            _scan_contents(data, record, limits, scan)
    if scan.values > values and scan.values - values != math.prod(shape):
        # Refused before millions of values are parsed (its name comes with the parse).
        raise InvalidRequest(f"an input has {scan.values - values} values for shape "
                             f"{shape}")


def _shape(data: memoryview, record: Record) -> list[int]:
    """The dimensions in a shape record (packed, or one), at most MAX_RANK of them."""
    if record.kind == VARINT:
        return [_varint(data, record.start, record.end)[0]]
    if record.kind != LENGTH:
        raise InvalidRequest("the request is not a valid protobuf message")
    if _varint_count(data, record) > MAX_RANK:
        raise InvalidRequest(f"an input has more than {MAX_RANK} dimensions")
    dims, at = [], record.start
    while at < record.end:
        dim, at = _varint(data, at, record.end)
        dims.append(dim)
    return dims


def _scan_contents(data: memoryview, contents: Record, limits: Limits, scan: _Scan) -> None:
    """Typed contents: no more images, values or records than the model takes."""
    scan.tensor_bytes += contents.end - contents.start
    limit = limits.max_images + MAX_RECORDS
    for record in records(data, contents.start, contents.end, limit, "an input's contents"):
        if record.field != BYTES_CONTENTS:
            scan.visit()  # an image is counted by the model's limit instead
        if record.field == BYTES_CONTENTS:
            scan.images += 1
            if scan.images > limits.max_images:
                raise InvalidRequest(f"more than {limits.max_images} images")
            if record.end - record.start > limits.max_image_bytes:
                raise PayloadTooLarge(f"an image is {record.end - record.start} bytes; the "
                                      f"limit is {limits.max_image_bytes} bytes")
            scan.files[-1].append(data[record.start:record.end])
        elif record.field in NUMERIC_WIDTH:
            scan.values += _value_count(data, record, NUMERIC_WIDTH[record.field])
            if scan.values > limits.max_elements:
                raise InvalidRequest(f"more than {limits.max_elements} values: more than the "
                                     f"model takes")
        else:  # not a tensor's: counts as overhead (names, shapes, parameters)
            scan.tensor_bytes -= record.end - record.head


def _value_count(data: memoryview, record: Record, width: int) -> int:
    if record.kind != LENGTH:  # one value, not packed
        return 1
    if not width:
        return _varint_count(data, record)
    if (record.end - record.start) % width:
        raise InvalidRequest("the request is not a valid protobuf message")
    return (record.end - record.start) // width


def _varint_count(data: memoryview, record: Record) -> int:
    """How many varints a packed field holds: each ends with a byte under 0x80."""
    payload = np.frombuffer(data[record.start:record.end], np.uint8)
    return int(np.count_nonzero(payload < 0x80))


def request_target(message: bytes) -> tuple[str, str]:
    """The model name and version a ModelInferRequest names (read before the rest, whose
    bounds are the model's)."""
    data = memoryview(message)
    found = {MODEL_NAME: "", MODEL_VERSION: ""}
    for record in records(data, 0, len(data), MAX_RECORDS, "the request"):
        if record.field in found and record.kind == LENGTH:
            if record.end - record.start > MAX_NAME_BYTES:
                raise InvalidRequest(f"a model name or version is over {MAX_NAME_BYTES} bytes")
            try:
                found[record.field] = str(data[record.start:record.end], "utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest("the model name is not UTF-8") from None
    return found[MODEL_NAME], found[MODEL_VERSION]


def parse_infer_request(message: bytes, limits: Limits, regions: Regions | None = None
                        ) -> tuple[InferRequest, Any]:
    """The request's tensors (raw ones as views into ``message``; those in shared memory
    checked against ``regions``'s) and the parsed message without them (for its names and
    id)."""
    data = memoryview(message)
    scan = _scan_request(data, limits)
    skeleton = b"".join(data[r.head:r.end] for r in scan.kept)
    try:
        request = pb.ModelInferRequest.FromString(skeleton)
    except Exception:  # upb's DecodeError, or what a malformed string field raises
        raise InvalidRequest("the request is not a valid ModelInferRequest") from None
    raw = [data[r.start:r.end] for r in scan.raw]
    wanted = [o.name for o in request.outputs] or None
    tensors = _tensors(request, raw, scan.files, limits, regions)
    into = {o.name: output_region(o.name[:64], _values(o.parameters), regions)
            for o in request.outputs if "shared_memory_region" in o.parameters}
    return InferRequest(request.id or None, tensors, wanted,
                        parameters=_values(request.parameters), regions=into), request


def _values(parameters: Any) -> dict[str, Any]:
    """InferParameter values unwrapped (whichever of bool, int64, uint64, double or string
    each holds)."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in parameters.items()}


def _tensors(request: Any, raw: Sequence[memoryview], files: list[list[memoryview]],
             limits: Limits, regions: Regions | None) -> dict[str, Tensor]:
    """The inputs, from raw_input_contents or typed contents (``files``: each input's
    bytes_contents, views into the message), or in shared memory, with the REST form's
    bounds."""
    shared = ["shared_memory_region" in spec.parameters for spec in request.inputs]
    if raw and len(raw) != shared.count(False):
        raise InvalidRequest("raw_input_contents must hold one entry per input (but those "
                             "in shared memory)")
    tensors = {}
    contents = iter(raw)
    for index, spec in enumerate(request.inputs):
        name, shape = spec.name[:64], list(spec.shape)
        check_rank(name, shape)
        if any(d < 0 for d in shape):
            raise InvalidRequest(f"input {name}: a shape of sizes")
        count = math.prod(shape)  # Python ints: [2**32, 2**32] does not wrap to 0
        budget = limits.max_images if spec.datatype == "BYTES" else limits.max_elements
        if count > budget:
            raise InvalidRequest(f"input {name}: shape {shape} holds {count} elements; at "
                                 f"most {budget} for this model")
        value: np.ndarray | list[memoryview] | RegionData
        if shared[index]:
            if spec.HasField("contents"):
                raise InvalidRequest(f"input {name}: contents and a shared memory region")
            value = input_region(name, spec.datatype, count, _values(spec.parameters), limits,
                                 regions)
            tensors[spec.name] = Tensor(spec.name, spec.datatype, shape, value)
            continue
        value = (_raw_value(next(contents), spec.datatype, name, limits) if raw
                 else _typed_value(spec, name, files[index]))
        if len(value) != count:
            raise InvalidRequest(f"input {name}: {len(value)} elements for shape {shape}")
        if isinstance(value, np.ndarray):
            value = value.reshape(shape)
        tensors[spec.name] = Tensor(spec.name, spec.datatype, shape, value)
    return tensors


def _raw_value(data: memoryview, datatype: str, name: str, limits: Limits
               ) -> np.ndarray | list[memoryview]:
    if datatype == "BYTES":
        return bytes_elements(data, name, limits)
    return numeric_values(data, datatype, name)


def _typed_value(spec: Any, name: str, files: list[memoryview]
                 ) -> np.ndarray | list[memoryview]:
    field = TYPED_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidRequest(f"input {name}: datatype {spec.datatype} is not accepted")
    if spec.datatype == "BYTES":  # found (sizes and count bounded) by the walk
        return files
    return _numeric_array(getattr(spec.contents, field), NUMERIC[spec.datatype])


def _numeric_array(values: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """Repeated protobuf numbers as an array, a chunk at a time (each chunk one short hold
    of the GIL, not one for millions of Python numbers)."""
    array = np.empty(len(values), dtype)
    for start in range(0, len(values), CONVERT_CHUNK):
        array[start:start + CONVERT_CHUNK] = values[start:start + CONVERT_CHUNK]
    return array


def parse_small(message: bytes, kind: Any) -> Any:
    """A request other than ModelInfer (a name, a version, a flag), refused past
    SMALL_MESSAGE_BYTES before it is parsed."""
    if len(message) > SMALL_MESSAGE_BYTES:
        raise InvalidRequest(f"the request is {len(message)} bytes; at most "
                             f"{SMALL_MESSAGE_BYTES} for this call")
    try:
        return kind.FromString(message)
    except Exception:  # upb's DecodeError
        raise InvalidRequest(f"the request is not a valid {kind.__name__}") from None


def infer_response(model: str, version: int, request_id: str,
                   tensors: list[OutputTensor], parsed: InferRequest) -> Any:
    """The ModelInferResponse: each output's raw contents at its place, empty for one
    written into a shared-memory region (Triton keeps the two lists parallel)."""
    written = into_regions(tensors, parsed)
    return pb.ModelInferResponse(
        model_name=model, model_version=str(version), id=request_id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(
            name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors],
        raw_output_contents=[b"" if t.name in written else t.raw() for t in tensors])
