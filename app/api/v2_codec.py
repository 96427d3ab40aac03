"""The Open Inference Protocol's (KServe v2, Triton) REST tensors: requests parsed, responses
built. Pure functions on bytes and arrays.

Inputs come as JSON (``data``: a flat, row-major list) or in the binary tensor extension
(the JSON header's length in ``Inference-Header-Content-Length``, then each input's raw bytes
in order, sized by its ``binary_data_size`` parameter), which is what tritonclient sends by
default. A BYTES element is, in binary, a 4-byte little-endian length and the bytes; in JSON, a
string holding the bytes in base64 (JSON cannot hold raw image bytes). Outputs are answered
in JSON, or in the binary extension where the request asks for it: ``binary_data`` in an
output's parameters, or ``binary_data_output`` in the request's (tritonclient's
``InferRequestedOutput(name, binary_data=True)``).

With the system shared memory extension (app.api.shm) an input names a region instead
(``shared_memory_region``, ``shared_memory_byte_size``, ``shared_memory_offset`` in its
parameters), and so may an output: the tensor is a ``RegionData``, checked against the region
here and read (or written) later, once the request holds its places.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from app.api.shm import OFF, Regions
from app.errors import InvalidRequest, PayloadTooLarge, Unsupported

NUMERIC: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"), "UINT8": np.dtype("u1")}


@dataclass(frozen=True)
class RegionData:
    """A tensor in a shared-memory region: ``byte_size`` bytes from ``offset`` in region
    ``region`` of ``regions``."""

    regions: Regions
    region: str
    offset: int
    byte_size: int

    def read(self, start: int = 0, size: int | None = None) -> bytearray:
        """A copy of its bytes [start, start + size) (default: all)."""
        return self.regions.read(self.region, self.offset + start,
                                 self.byte_size - start if size is None else size)


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    # numeric array, BYTES elements, or where it lies in shared memory (not read yet)
    value: np.ndarray | list[memoryview] | RegionData


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[str] | None  # names asked for; None: all
    binary: dict[str, bool] = field(default_factory=dict)  # an output's own binary_data
    binary_default: bool = False  # the request's binary_data_output
    parameters: dict[str, Any] = field(default_factory=dict)  # the request's own
    regions: dict[str, RegionData] = field(default_factory=dict)  # outputs asked into one

    def wants_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_default)


@dataclass(frozen=True)
class Limits:
    """What one request may carry, from what the model can take: checked before any list of
    elements is built, so that a body of millions of tiny items costs a scan, not seconds of
    parsing and gigabytes."""

    max_images: int  # BYTES elements
    max_image_bytes: int  # one BYTES element (MAX_UPLOAD_BYTES, as /detect)
    max_elements: int  # numeric elements of all inputs together (images + sizes)


# The most dimensions a tensor may have: the model's inputs have 4; numpy stops at 64 and
# raises on more, which was a 500.
MAX_RANK = 8

# A request is a few objects and lists (inputs, shapes, parameters, outputs); data is flat.
# More than this many is no request a client builds, but a body of empty lists would cost
# orjson seconds of the event loop's GIL (it parses without releasing it).
MAX_JSON_CONTAINERS = 4096


def parse_request(body: bytes | bytearray, header_length: int | None, limits: Limits,
                  regions: Regions | None = None) -> InferRequest:
    """An inference request, in JSON or with binary inputs after a JSON header; tensors in
    shared memory are checked against ``regions``'s."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidRequest("Inference-Header-Content-Length is not within the body")
    view = memoryview(body)
    header = body if header_length is None else bytes(view[:header_length])
    payload = view[len(header):]
    _bound_json(header, limits)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidRequest("the request needs an 'inputs' list")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for spec in document["inputs"]:
        tensor, used = _input(spec, payload, offset, limits, regions)
        inputs[tensor.name] = tensor
        offset += used
    if offset != len(payload):
        raise InvalidRequest("the binary data does not match the inputs' binary_data_size")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    names, binary, into = _requested_outputs(document.get("outputs"), regions)
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object")
    return InferRequest(request_id, inputs, names, binary,
                        _flag(parameters, "binary_data_output", "the request"), parameters,
                        into)


def _bound_json(text: bytes | bytearray, limits: Limits) -> None:
    """Refuse, by counting bytes (no parsing), JSON with more containers or items than any
    request for this model has."""
    containers = text.count(b"[") + text.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise InvalidRequest(f"the request has {containers} JSON lists and objects; at most "
                             f"{MAX_JSON_CONTAINERS}")
    if text.count(b",") > limits.max_elements + MAX_JSON_CONTAINERS:
        raise InvalidRequest(f"the request has more items than the model takes "
                             f"({limits.max_elements} values at most)")


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where}: parameter {name} must be true or false")
    return value


def _requested_outputs(wanted: Any, regions: Regions | None
                       ) -> tuple[list[str] | None, dict[str, bool], dict[str, RegionData]]:
    """The outputs asked for (None: all), those that say whether they want binary, and those
    asked into a shared-memory region."""
    if wanted is None or wanted == []:
        return None, {}, {}
    if not isinstance(wanted, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name' string")
    binary, into = {}, {}
    for spec in wanted:
        name = spec["name"][:64]
        parameters = spec.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"output {name}: 'parameters' must be an object")
        if "binary_data" in parameters:
            binary[spec["name"]] = _flag(parameters, "binary_data", f"output {name}")
        if "shared_memory_region" in parameters:
            if binary.get(spec["name"]) or "classification" in parameters:
                raise InvalidRequest(f"output {name}: a shared-memory output cannot be binary "
                                     f"data or a classification")
            into[spec["name"]] = output_region(name, parameters, regions)
    return [o["name"] for o in wanted], binary, into


SHM_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def _region_of(where: str, parameters: dict[str, Any], regions: Regions | None
               ) -> tuple[Regions, str, int, int]:
    """The region, offset and byte size a tensor's parameters name (values already unwrapped
    from gRPC's InferParameter)."""
    if regions is None or not regions.enabled:
        raise Unsupported(OFF)
    region = parameters.get("shared_memory_region")
    size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not region:
        raise InvalidRequest(f"{where}: shared_memory_region must be a region's name")
    for value, what in ((size, "shared_memory_byte_size"), (offset, "shared_memory_offset")):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
            raise InvalidRequest(f"{where}: {what} must be an unsigned integer")
    assert isinstance(size, int) and isinstance(offset, int)
    return regions, region, offset, size


def input_region(name: str, datatype: str, count: int, parameters: dict[str, Any],
                 limits: Limits, regions: Regions | None) -> RegionData:
    """An input in shared memory: as many bytes as its shape holds (BYTES: at most the
    model's images and limit), within its region."""
    regions, region, offset, size = _region_of(f"input {name}", parameters, regions)
    dtype = NUMERIC.get(datatype)
    if datatype == "BYTES":
        if not 4 * count <= size <= count * (4 + limits.max_image_bytes):
            raise InvalidRequest(f"input {name}: shared_memory_byte_size {size} cannot hold "
                                 f"{count} BYTES elements of at most {limits.max_image_bytes} "
                                 f"bytes")
    elif dtype is None:
        raise InvalidRequest(f"input {name}: datatype {datatype} is not accepted")
    elif size != count * dtype.itemsize:
        raise InvalidRequest(f"input {name}: shared_memory_byte_size {size} is not the "
                             f"{count * dtype.itemsize} bytes its shape holds")
    regions.check(region, offset, size)
    return RegionData(regions, region, offset, size)


def output_region(name: str, parameters: dict[str, Any], regions: Regions | None
                  ) -> RegionData:
    """An output asked into shared memory: room for at most ``byte_size`` bytes."""
    regions, region, offset, size = _region_of(f"output {name}", parameters, regions)
    regions.check(region, offset, size)
    return RegionData(regions, region, offset, size)


def _input(spec: Any, binary: memoryview, offset: int, limits: Limits,
           regions: Regions | None) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise InvalidRequest("each input must be an object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if (not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise InvalidRequest("each input needs a name, a datatype and a shape of sizes")
    check_rank(name, shape)
    count = math.prod(shape)  # Python ints: no overflow
    budget = limits.max_images if datatype == "BYTES" else limits.max_elements
    if count > budget:
        raise InvalidRequest(f"input {name}: shape {shape[:8]} holds {count} elements; at most "
                             f"{budget} for this model")
    parameters = spec.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequest(f"input {name}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    sources = (size is not None) + ("data" in spec) + ("shared_memory_region" in parameters)
    if sources > 1:
        raise InvalidRequest(f"input {name}: give one of data, binary_data_size and "
                             f"shared_memory_region")
    if "shared_memory_region" in parameters:
        return Tensor(name, datatype, shape, input_region(
            name, datatype, count, parameters, limits, regions)), 0
    if size is not None:
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or offset + size > len(binary)):
            raise InvalidRequest(f"input {name}: binary_data_size runs past the body")
        raw = binary[offset:offset + size]
        value: np.ndarray | list[memoryview] = (bytes_elements(raw, name, limits)
                                           if datatype == "BYTES"
                                           else numeric_values(raw, datatype, name))
        used = size
    else:
        data = spec.get("data")
        if not isinstance(data, list):
            raise InvalidRequest(f"input {name}: needs 'data' or binary data")
        value = _json_bytes(data, name, limits) if datatype == "BYTES" else _json_numeric(
            data, datatype, name)
        used = 0
    if len(value) != count:
        raise InvalidRequest(f"input {name}: {len(value)} elements for shape {shape}")
    if isinstance(value, np.ndarray):
        value = value.reshape(shape)
    return Tensor(name, datatype, shape, value), used


def check_rank(name: str, shape: list[int]) -> None:
    if len(shape) > MAX_RANK:
        raise InvalidRequest(f"input {name[:64]}: {len(shape)} dimensions; at most {MAX_RANK}")


def numeric_values(raw: memoryview, datatype: str, name: str) -> np.ndarray:
    """Raw little-endian values of ``datatype`` (the binary extension's, gRPC's raw
    contents), copied out of the body."""
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name}: datatype {datatype} is not accepted")
    if len(raw) % dtype.itemsize:
        raise InvalidRequest(f"input {name}: {len(raw)} bytes are no whole {datatype} values")
    array: np.ndarray = np.frombuffer(raw, dtype).copy()  # its own memory, not the body's
    return array


def _json_numeric(data: list[Any], datatype: str, name: str) -> np.ndarray:
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name}: datatype {datatype} is not accepted")
    if None in data:  # numpy would make it NaN
        raise InvalidRequest(f"input {name}: data holds null")
    try:
        array: np.ndarray = np.asarray(data, dtype).reshape(-1)
        return array
    except (ValueError, TypeError, OverflowError):
        raise InvalidRequest(f"input {name}: data is not a flat list of {datatype} numbers"
                             ) from None


def bytes_elements(raw: memoryview, name: str, limits: Limits) -> list[memoryview]:
    """The elements of the binary extension's BYTES table (4-byte length, then the bytes),
    refused as soon as there are more than the model takes or one is over the size limit.
    Views into the body, not copies: the body is held once, for the places it was admitted
    with; a decode worker copies its element when it starts."""
    elements: list[memoryview] = []
    offset = 0
    while offset < len(raw):
        if len(elements) == limits.max_images:
            raise InvalidRequest(f"input {name}: more than {limits.max_images} images")
        if offset + 4 > len(raw):
            raise InvalidRequest(f"input {name}: a BYTES element's length is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(f"input {name}: a BYTES element runs past its data")
        if length > limits.max_image_bytes:
            raise PayloadTooLarge(f"input {name}: an image is {length} bytes; the limit is "
                                  f"{limits.max_image_bytes} bytes")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def _json_bytes(data: list[Any], name: str, limits: Limits) -> list[memoryview]:
    if len(data) > limits.max_images:
        raise InvalidRequest(f"input {name}: more than {limits.max_images} images")
    elements = []
    for item in data:
        if not isinstance(item, str):
            raise InvalidRequest(f"input {name}: BYTES in JSON must be base64 strings")
        if len(item) > limits.max_image_bytes * 4 // 3 + 4:
            raise PayloadTooLarge(f"input {name}: an image is over the limit of "
                                  f"{limits.max_image_bytes} bytes")
        try:
            elements.append(memoryview(base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"input {name}: BYTES in JSON must be base64 strings"
                                 ) from None
    return elements
