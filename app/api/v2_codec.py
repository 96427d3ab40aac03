"""The Open Inference Protocol's (KServe v2, Triton) REST tensors: requests parsed, responses
built. Pure functions on bytes and arrays.

Inputs come as JSON (``data``: a flat, row-major list) or in the binary tensor extension
(the JSON header's length in ``Inference-Header-Content-Length``, then each input's raw bytes
in order, sized by its ``binary_data_size`` parameter), which is what tritonclient sends by
default. A BYTES element is, in binary, a 4-byte little-endian length and the bytes; in JSON, a
string holding the bytes in base64 (JSON cannot hold raw image bytes). Responses are JSON.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.errors import InvalidRequest

NUMERIC: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"), "UINT8": np.dtype("u1")}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    value: np.ndarray | list[bytes]  # numeric array, or BYTES elements


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[str] | None  # names asked for; None: all


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """An inference request, in JSON or with binary inputs after a JSON header."""
    header, binary = (body, b"") if header_length is None else (
        body[:header_length], body[header_length:])
    if header_length is not None and not 0 < header_length <= len(body):
        raise InvalidRequest("Inference-Header-Content-Length is not within the body")
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidRequest("the request needs an 'inputs' list")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for spec in document["inputs"]:
        tensor, used = _input(spec, binary, offset)
        inputs[tensor.name] = tensor
        offset += used
    if offset != len(binary):
        raise InvalidRequest("the binary data does not match the inputs' binary_data_size")
    wanted = document.get("outputs")
    names = ([str(o.get("name")) for o in wanted if isinstance(o, dict)]
             if isinstance(wanted, list) and wanted else None)
    request_id = document.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, inputs, names)


def _input(spec: Any, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise InvalidRequest("each input must be an object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if (not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InvalidRequest("each input needs a name, a datatype and a shape of sizes")
    count = int(np.prod(shape)) if shape else 1
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidRequest(f"input {name}: binary_data_size runs past the body")
        raw = binary[offset:offset + size]
        value: np.ndarray | list[bytes] = (_bytes_elements(raw, name) if datatype == "BYTES"
                                           else _numeric(raw, datatype, name))
        used = size
    else:
        data = spec.get("data")
        if not isinstance(data, list):
            raise InvalidRequest(f"input {name}: needs 'data' or binary data")
        value = _json_bytes(data, name) if datatype == "BYTES" else _json_numeric(
            data, datatype, name)
        used = 0
    if len(value) != count:
        raise InvalidRequest(f"input {name}: {len(value)} elements for shape {shape}")
    if isinstance(value, np.ndarray):
        value = value.reshape(shape)
    return Tensor(name, datatype, shape, value), used


def _numeric(raw: bytes, datatype: str, name: str) -> np.ndarray:
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name}: datatype {datatype} is not accepted")
    if len(raw) % dtype.itemsize:
        raise InvalidRequest(f"input {name}: {len(raw)} bytes are no whole {datatype} values")
    array: np.ndarray = np.frombuffer(raw, dtype)
    return array


def _json_numeric(data: list[Any], datatype: str, name: str) -> np.ndarray:
    dtype = NUMERIC.get(datatype)
    if dtype is None:
        raise InvalidRequest(f"input {name}: datatype {datatype} is not accepted")
    try:
        array: np.ndarray = np.asarray(data, dtype).reshape(-1)
        return array
    except (ValueError, TypeError):
        raise InvalidRequest(f"input {name}: data is not a flat list of numbers") from None


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"input {name}: a BYTES element's length is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(f"input {name}: a BYTES element runs past its data")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def _json_bytes(data: list[Any], name: str) -> list[bytes]:
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, ValueError, TypeError):
        raise InvalidRequest(f"input {name}: BYTES in JSON must be base64 strings") from None


def output(name: str, value: np.ndarray | list[list[str]], datatype: str) -> dict[str, Any]:
    """One output tensor in JSON: shape and flat, row-major data."""
    if isinstance(value, np.ndarray):
        return {"name": name, "datatype": datatype, "shape": list(value.shape),
                "data": value.reshape(-1).tolist()}
    shape = [len(value), len(value[0]) if value else 0]
    return {"name": name, "datatype": datatype, "shape": shape,
            "data": [item for row in value for item in row]}
