"""The walk of a ModelInferRequest's wire bytes (app.api.grpc_wire): what tritonclient and the
generated stub send is read as the generated parser reads it, and what would cost millions of
objects is refused before anything is parsed."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb

from app.api.grpc_gate import MAX_OVERHEAD_BYTES
from app.api.grpc_wire import (
    MAX_RECORDS,
    SMALL_MESSAGE_BYTES,
    parse_infer_request,
    parse_small,
    request_target,
)
from app.api.v2_codec import MAX_RANK, Limits
from app.errors import InvalidRequest, PayloadTooLarge
from tests.helpers import protobuf_field

# The shipped model's (320 x 320) limits with the default settings.
LIMITS = Limits(16, 16 * 1024 * 1024, 16 * (3 * 320 * 320 + 2))


def tritonclient_request(inputs: list[tgrpc.InferInput], outputs: tuple[str, ...] = ()
                         ) -> bytes:
    """The message tritonclient.grpc builds for ``infer`` (its own request builder)."""
    from tritonclient.grpc._utils import _get_inference_request

    request = _get_inference_request(
        model_name="m", inputs=inputs, model_version="2", request_id="id-1",
        outputs=[tgrpc.InferRequestedOutput(o) for o in outputs], sequence_id=0,
        sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None)
    return bytes(request.SerializeToString())


def test_tritonclient_bytes_are_views_into_the_message() -> None:
    image = tgrpc.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.asarray([b"first", b"second"], dtype=object))
    message = tritonclient_request([image], ("scores",))
    parsed, request = parse_infer_request(message, LIMITS)
    assert request_target(message) == ("m", "2")
    assert parsed.id == "id-1" and parsed.outputs == ["scores"] and request.model_name == "m"
    files = parsed.inputs["image"].value
    assert [bytes(f) for f in files] == [b"first", b"second"]
    assert all(isinstance(f, memoryview) and f.obj is message for f in files)  # no copy


def test_raw_and_typed_numeric_inputs_read_as_the_generated_parser_reads_them() -> None:
    pixels = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)
    sizes = np.asarray([[640, 480], [2, 3]], np.int64)
    images, target = tgrpc.InferInput("images", [2, 3, 320, 320], "FP32"), \
        tgrpc.InferInput("orig_target_sizes", [2, 2], "INT64")
    images.set_data_from_numpy(pixels)
    target.set_data_from_numpy(sizes)
    raw, _ = parse_infer_request(tritonclient_request([images, target]), LIMITS)

    typed = pb.ModelInferRequest(model_name="m")
    tensor = typed.inputs.add(name="images", datatype="FP32", shape=[2, 3, 320, 320])
    tensor.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    tensor = typed.inputs.add(name="orig_target_sizes", datatype="INT64", shape=[2, 2])
    tensor.contents.int64_contents.extend(sizes.reshape(-1).tolist())
    files = typed.inputs.add(name="image", datatype="BYTES", shape=[1])
    files.contents.bytes_contents.append(b"an image")
    from_typed, _ = parse_infer_request(typed.SerializeToString(), LIMITS)
    for parsed in (raw, from_typed):
        np.testing.assert_array_equal(parsed.inputs["images"].value, pixels)
        np.testing.assert_array_equal(parsed.inputs["orig_target_sizes"].value, sizes)
    assert [bytes(f) for f in from_typed.inputs["image"].value] == [b"an image"]


def _bytes_input(contents: bytes, shape: int = 1) -> bytes:
    head = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[shape])
    return protobuf_field(5, head.SerializeToString() + protobuf_field(5, contents))


def _fp32_input(shape: list[int], values: int) -> bytes:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="images", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend([0.5] * values)
    return bytes(request.SerializeToString())


@pytest.mark.parametrize(("message", "error"), [
    (b"\x2a\x00" * (8 << 20), "more than 16 inputs"),  # 16 MiB of empty inputs
    (b"\x32\x00" * (8 << 20), "more than 16 outputs"),
    (b"\x22\x00" * (8 << 20), "more than 64 parameters"),
    (b"\x08\x01" * (8 << 20), f"more than {MAX_RECORDS} fields"),  # a repeated model_name
    (_bytes_input(b"\x42\x00" * (8 << 20)), "more than 16 images"),
    (_fp32_input([1, 3, 320, 320], 4_000_000), "4000000 values for shape [1, 3, 320, 320]"),
    (_fp32_input([16, 3, 320, 320], LIMITS.max_elements + 1), "more than the model takes"),
    (_fp32_input([1] * (MAX_RANK + 1), 1), f"more than {MAX_RANK} dimensions"),
    (protobuf_field(15, bytes(MAX_OVERHEAD_BYTES)), "beside its tensors"),  # an unknown field
    (b"\x0a\x10short", "not a valid protobuf"),  # a length past the end
    (b"\x08\xff\xff", "not a valid protobuf"),  # a varint cut short
    (b"\x0b", "not a valid protobuf"),  # a group
    (b"\x02\x00", "not a valid protobuf"),  # field 0
    # 16 inputs of 256 contents of 272 unknown fields: 1.1M records within every per-message
    # bound (0.8 s of walking and parsing before the walk had one budget).
    (protobuf_field(5, protobuf_field(5, b"\x48\x00" * (MAX_RECORDS + 16)) * MAX_RECORDS) * 16,
     "more than 1024 fields beside its images"),
], ids=["inputs", "outputs", "parameters", "records", "bytes-contents", "values-for-shape",
        "values", "rank", "overhead", "length", "varint", "group", "field-0", "nested"])
def test_what_would_cost_millions_of_objects_is_refused_unparsed(message: bytes,
                                                                 error: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequest, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_infer_request(message, LIMITS)
    assert time.perf_counter() - started < 0.5  # parsing any of these took seconds


def test_an_unpacked_shape_counts_its_dimensions_too() -> None:
    head = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32")
    dims = b"\x18\x01" * (MAX_RANK + 1)  # shape as separate varint records
    with pytest.raises(InvalidRequest, match="dimensions"):
        parse_infer_request(protobuf_field(5, head.SerializeToString() + dims), LIMITS)


def test_shapes_multiply_in_python_ints() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="images", datatype="FP32", shape=[2**32, 2**32])
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidRequest, match="18446744073709551616 elements"):
        parse_infer_request(request.SerializeToString(), LIMITS)


def test_an_image_over_the_upload_limit_is_too_large() -> None:
    limits = Limits(16, 1024, LIMITS.max_elements)
    with pytest.raises(PayloadTooLarge):
        parse_infer_request(_bytes_input(protobuf_field(8, bytes(1025))), limits)
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="image", datatype="BYTES", shape=[1])
    raw.raw_input_contents.append(struct.pack("<I", 1025) + bytes(1025))
    with pytest.raises(PayloadTooLarge):
        parse_infer_request(raw.SerializeToString(), limits)


def test_model_names_are_bounded_and_utf8() -> None:
    with pytest.raises(InvalidRequest, match="UTF-8"):
        request_target(protobuf_field(1, b"\xff\xfe"))
    with pytest.raises(InvalidRequest, match="over"):
        request_target(protobuf_field(1, b"m" * 5000))


def test_small_requests_are_bounded_before_they_are_parsed() -> None:
    request = pb.ModelMetadataRequest(name="m", version="1")
    assert parse_small(request.SerializeToString(), pb.ModelMetadataRequest).name == "m"
    with pytest.raises(InvalidRequest, match="at most"):
        parse_small(b"\x1a\x00" * SMALL_MESSAGE_BYTES, pb.RepositoryModelLoadRequest)
    with pytest.raises(InvalidRequest, match="not a valid"):
        parse_small(b"\x0a\x10short", pb.ModelMetadataRequest)
