"""System shared memory (and CUDA shared memory's refusals) with tritonclient's own HTTP and
gRPC clients and its shared-memory helpers, against a real server: tensors and image files
read from a region answer as the same sent in the body, outputs written into a region read
back equal, every refusal is a 4xx that leaves the service serving, and with FRONTENDS=2 a
region registered through one front end serves through the other."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from app.bench.cli import free_port
from tests.helpers import Server, encode, render_scene, run_server
from tests.integration.test_frontends import ask, connections_to_each, frontend_pids

MODEL = "dfine_n_shapes"
PREFIX = f"/p30shm-{os.getpid()}-"
API, CONTROL = {"x-api-key": "infer-key"}, {"x-api-key": "control-key"}
SIDE = 320  # the shipped model's input
KEYS = {"DFINE_API_KEY": "infer-key", "DFINE_CONTROL_API_KEY": "control-key",
        "DFINE_SHM_KEY_PREFIXES": PREFIX, "DFINE_MAX_SHM_REGIONS": "6",
        "DFINE_MAX_SHM_BYTES": str(16 * 1024 * 1024)}


class Running:
    def __init__(self, server: Server, grpc_port: int) -> None:
        self.server = server
        self.http = thttp.InferenceServerClient(server.url.removeprefix("http://"))
        self.grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    port = free_port()
    with run_server(tmp_path_factory.mktemp("shm"), "--grpc-port", str(port),
                    "--max-batch-size", "4", env=KEYS) as server:
        yield Running(server, port)


@pytest.fixture
def segments() -> Iterator[Callable[[str, int], Any]]:
    """Segments made as a client makes them, destroyed after the test."""
    made: list[Any] = []

    def make(suffix: str, size: int) -> Any:
        handle = shm.create_shared_memory_region(suffix, PREFIX + suffix, size)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture(autouse=True)
def clean(running: Running) -> Iterator[None]:
    yield
    running.http.unregister_system_shared_memory(headers=CONTROL)


def _tensor(seed: int) -> np.ndarray:
    """A preprocessed image, [1, 3, 320, 320] in 0..1."""
    image = cv2.resize(render_scene(seed)[0], (SIDE, SIDE))[:, :, ::-1]
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], np.float32) / 255


def _by_body(client: Any, module: Any, tensor: np.ndarray | None = None,
             image: bytes | None = None) -> Any:
    if tensor is not None:
        given = module.InferInput("images", list(tensor.shape), "FP32")
        given.set_data_from_numpy(tensor)
    else:
        given = module.InferInput("image", [1], "BYTES")
        given.set_data_from_numpy(np.array([image], dtype=object))
    return client.infer(MODEL, [given], headers=dict(API))


def _assert_same(got: Any, want: Any) -> None:
    for name in ("labels", "scores", "boxes"):
        np.testing.assert_allclose(got[name], want.as_numpy(name), atol=1e-3, err_msg=name)


def _refused(call: Callable[[], Any], status: str, words: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == status, (caught.value.status(), caught.value.message())
    assert words in caught.value.message(), caught.value.message()


def _infer_from(client: Any, module: Any, region: str, size: int, offset: int = 0,
                datatype: str = "FP32", shape: list[int] | None = None) -> Any:
    name = "images" if datatype == "FP32" else "image"
    given = module.InferInput(name, shape or ([1, 3, SIDE, SIDE] if datatype == "FP32"
                                              else [1]), datatype)
    given.set_shared_memory(region, size, offset)
    return client.infer(MODEL, [given], headers=dict(API))


def _client(running: Running, transport: str) -> tuple[Any, Any]:
    """tritonclient's client for ``transport`` (http or grpc) and its module."""
    return (running.http, thttp) if transport == "http" else (running.grpc, tgrpc)


def test_the_server_metadata_lists_shared_memory_while_it_is_on(running: Running) -> None:
    over_http = running.http.get_server_metadata(headers=API)["extensions"]
    over_grpc = list(running.grpc.get_server_metadata(headers=API).extensions)
    assert "system_shared_memory" in over_http and over_http == over_grpc
    assert "cuda_shared_memory" not in over_http


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_tensor_and_an_image_file_in_a_region_answer_as_in_the_body(
        running: Running, segments: Any, transport: str) -> None:
    client, module = _client(running, transport)
    tensor = _tensor(3)
    image = encode(render_scene(4)[0])
    element = serialize_byte_tensor(np.array([image], dtype=object))
    length = len(element.item())  # a 4-byte length, then the file
    # One segment, both tensors: the image file after the tensor, at an offset of its own.
    handle = segments(f"in-{transport}", tensor.nbytes + length + 100)
    shm.set_shared_memory_region(handle, [tensor])
    shm.set_shared_memory_region(handle, [element], offset=tensor.nbytes + 100)
    client.register_system_shared_memory("in", PREFIX + f"in-{transport}",
                                         tensor.nbytes + length + 100, headers=CONTROL)

    got = _infer_from(client, module, "in", tensor.nbytes)
    _assert_same({n: got.as_numpy(n) for n in ("labels", "scores", "boxes")},
                 _by_body(client, module, tensor=tensor))
    got = _infer_from(client, module, "in", length, tensor.nbytes + 100, "BYTES")
    want = _by_body(client, module, image=image)
    _assert_same({n: got.as_numpy(n) for n in ("labels", "scores", "boxes")}, want)
    assert (got.as_numpy("names") == want.as_numpy("names")).all()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_outputs_written_into_a_region_read_back_equal(
        running: Running, segments: Any, transport: str) -> None:
    client, module = _client(running, transport)
    tensor = _tensor(5)
    size = 300 * 4 * 4 + 300 * 4 + 300 * 8
    handle = segments(f"out-{transport}", size + 16)
    client.register_system_shared_memory("out", PREFIX + f"out-{transport}", size,
                                         offset=16, headers=CONTROL)
    given = module.InferInput("images", list(tensor.shape), "FP32")
    given.set_data_from_numpy(tensor)
    boxes, scores, labels = (module.InferRequestedOutput(n) for n in ("boxes", "scores",
                                                                       "labels"))
    boxes.set_shared_memory("out", 4800)
    scores.set_shared_memory("out", 1200, offset=4800)
    result = client.infer(MODEL, [given], outputs=[boxes, scores, labels], headers=dict(API))
    want = _by_body(client, module, tensor=tensor)
    for name, offset in (("boxes", 16), ("scores", 16 + 4800)):
        out = result.get_output(name)
        datatype, shape = ((out["datatype"], out["shape"]) if transport == "http"
                           else (out.datatype, list(out.shape)))
        if transport == "http":
            assert set(out) == {"name", "datatype", "shape"}  # no data, no parameters
        assert datatype == "FP32"
        read = shm.get_contents_as_numpy(handle, np.float32, shape, offset=offset)
        np.testing.assert_allclose(read, want.as_numpy(name), atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(result.as_numpy("labels"), want.as_numpy("labels"))
    if transport == "grpc":  # raw contents stay parallel to outputs: empty for a region's
        raw = result.get_response().raw_output_contents
        assert [len(r) for r in raw][:2] == [0, 0] and len(raw[2]) == 300 * 8


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_each_refusal_is_a_4xx_and_the_service_serves_on(
        running: Running, segments: Any, transport: str) -> None:
    client, module = _client(running, transport)
    codes = ({"invalid": "422", "missing": "404", "exists": "409", "key": "403",
              "off": "501"} if transport == "http" else
             {"invalid": "StatusCode.INVALID_ARGUMENT", "missing": "StatusCode.NOT_FOUND",
              "exists": "StatusCode.ALREADY_EXISTS", "key": "StatusCode.PERMISSION_DENIED",
              "off": "StatusCode.UNIMPLEMENTED"})
    tensor = _tensor(6)
    key = PREFIX + f"bad-{transport}"
    handle = segments(f"bad-{transport}", tensor.nbytes)
    shm.set_shared_memory_region(handle, [tensor])
    register = client.register_system_shared_memory
    # The segment is shorter than the region; a key outside the prefix; the inference key.
    _refused(lambda: register("r", key, tensor.nbytes + 1, headers=CONTROL), codes["invalid"],
             "runs past the segment")
    _refused(lambda: register("r", "/elsewhere", 8, headers=CONTROL), codes["invalid"],
             "is not allowed")
    _refused(lambda: register("r", "/" + PREFIX.strip("/") + "x/../../etc", 8,
                              headers=CONTROL), codes["invalid"], "not a segment name")
    _refused(lambda: register("r", key, 8, headers=dict(API)), codes["key"], "CONTROL_API_KEY")
    _refused(lambda: register("r", PREFIX + "absent", 8, headers=CONTROL), codes["invalid"],
             "unable to open")
    register("r", key, tensor.nbytes, headers=CONTROL)
    _refused(lambda: register("r", key, 8, headers=CONTROL), codes["exists"],
             "already in manager")
    # Unknown region, an offset past its end, a size that runs past it or is not the shape's.
    _refused(lambda: _infer_from(client, module, "nothing", tensor.nbytes), codes["missing"],
             "Unable to find shared memory region")
    _refused(lambda: _infer_from(client, module, "r", tensor.nbytes, tensor.nbytes + 4),
             codes["invalid"], "Invalid offset")
    _refused(lambda: _infer_from(client, module, "r", tensor.nbytes, 4), codes["invalid"],
             "Invalid offset + byte size")
    _refused(lambda: _infer_from(client, module, "r", 64), codes["invalid"],
             "is not the 1228800 bytes")
    # An output region too small for the output: refused after the run, nothing written.
    given = module.InferInput("images", list(tensor.shape), "FP32")
    given.set_data_from_numpy(tensor)
    boxes = module.InferRequestedOutput("boxes")
    boxes.set_shared_memory("r", 100)
    _refused(lambda: client.infer(MODEL, [given], outputs=[boxes], headers=dict(API)),
             codes["invalid"], "should be at least 4800 bytes")
    # CUDA shared memory: none, and not supported.
    cuda = client.register_cuda_shared_memory
    raw_handle = b"\0" * 64 if transport == "grpc" else base64.b64encode(b"\0" * 64).decode()
    _refused(lambda: cuda("c", raw_handle, 0, 8, headers=CONTROL), codes["off"],
             "CUDA shared memory is not supported")
    client.unregister_cuda_shared_memory(headers=CONTROL)
    assert not client.get_cuda_shared_memory_status(headers=CONTROL) or transport == "grpc"
    # Still serving, from the region too.
    _assert_same({n: _infer_from(client, module, "r", tensor.nbytes).as_numpy(n)
                  for n in ("labels", "scores", "boxes")},
                 _by_body(client, module, tensor=tensor))


def test_status_lists_regions_unregister_frees_and_the_bounds_hold(
        running: Running, segments: Any) -> None:
    rest, grpc = running.http, running.grpc
    for k in range(3):
        segments(f"s{k}", 4096)
        rest.register_system_shared_memory(f"s{k}", PREFIX + f"s{k}", 1024, offset=k,
                                           headers=CONTROL)
    assert rest.get_system_shared_memory_status(headers=CONTROL) == [
        {"name": f"s{k}", "key": PREFIX + f"s{k}", "offset": k, "byte_size": 1024}
        for k in range(3)]
    assert rest.get_system_shared_memory_status("s1", headers=CONTROL)[0]["offset"] == 1
    status = grpc.get_system_shared_memory_status(headers=CONTROL, as_json=True)
    assert status["regions"]["s2"] == {"name": "s2", "key": PREFIX + "s2", "offset": "2",
                                       "byte_size": "1024"}
    # The bytes bound: a segment counted once, whole, however many regions lie in it.
    segments("big", 16 * 1024 * 1024)
    _refused(lambda: rest.register_system_shared_memory(
        "big", PREFIX + "big", 8, headers=CONTROL), "409", "MAX_SHM_BYTES")
    for k in range(3):
        rest.register_system_shared_memory(f"again{k}", PREFIX + "s0", 8, headers=CONTROL)
    _refused(lambda: rest.register_system_shared_memory(
        "seventh", PREFIX + "s0", 8, headers=CONTROL), "409", "MAX_SHM_REGIONS")
    grpc.unregister_system_shared_memory("s1", headers=CONTROL)
    rest.unregister_system_shared_memory("never-registered", headers=CONTROL)
    names = [r["name"] for r in rest.get_system_shared_memory_status(headers=CONTROL)]
    assert names == ["s0", "s2", "again0", "again1", "again2"]
    _refused(lambda: rest.get_system_shared_memory_status("s1", headers=CONTROL), "404",
             "Unable to find")
    grpc.unregister_system_shared_memory(headers=CONTROL)
    assert rest.get_system_shared_memory_status(headers=CONTROL) == []
    _refused(lambda: _infer_from(rest, thttp, "s0", 4 * 3 * SIDE * SIDE), "404",
             "Unable to find")


def test_a_segment_truncated_or_unlinked_after_registering(running: Running,
                                                            segments: Any) -> None:
    """Truncated: a 4xx, never SIGBUS; unlinked: still served (the registration holds it,
    as Triton's mapping does)."""
    tensor = _tensor(7)
    for name in ("cut", "gone"):
        handle = segments(name, tensor.nbytes)
        shm.set_shared_memory_region(handle, [tensor])
        running.http.register_system_shared_memory(name, PREFIX + name, tensor.nbytes,
                                                   headers=CONTROL)
    os.truncate(Path("/dev/shm") / (PREFIX + "cut").lstrip("/"), 100)
    _refused(lambda: _infer_from(running.http, thttp, "cut", tensor.nbytes), "422",
             "segment was truncated")
    os.unlink(Path("/dev/shm") / (PREFIX + "gone").lstrip("/"))
    try:
        _assert_same({n: _infer_from(running.grpc, tgrpc, "gone", tensor.nbytes).as_numpy(n)
                      for n in ("labels", "scores", "boxes")},
                     _by_body(running.http, thttp, tensor=tensor))
    finally:
        with open(Path("/dev/shm") / (PREFIX + "gone").lstrip("/"), "wb"):
            pass  # back, for the fixture's unlink
    assert running.server.process.poll() is None


def test_off_without_key_prefixes(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-batch-size", "2") as server:
        client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
        _refused(lambda: client.register_system_shared_memory("r", "/any", 8), "501",
                 "SHM_KEY_PREFIXES")
        assert client.get_system_shared_memory_status() == []
        client.unregister_system_shared_memory()
        _refused(lambda: _infer_from(client, thttp, "r", 4 * 3 * SIDE * SIDE), "501",
                 "system shared memory is off")


def test_with_two_front_ends_a_region_is_the_service_s(tmp_path: Path, segments: Any) -> None:
    tensor = _tensor(8)
    handle = segments("fe", tensor.nbytes)
    shm.set_shared_memory_region(handle, [tensor])
    body = json.dumps({"inputs": [{
        "name": "images", "shape": list(tensor.shape), "datatype": "FP32",
        "parameters": {"shared_memory_region": "fe", "shared_memory_byte_size": tensor.nbytes}
    }], "outputs": [{"name": "scores"}]}).encode()
    path = f"/v2/models/{MODEL}/infer"
    with run_server(tmp_path, "--frontends", "2", "--max-batch-size", "2",
                    env={"DFINE_SHM_KEY_PREFIXES": PREFIX}, ready_timeout_s=120) as server:
        one, other = connections_to_each(server, frontend_pids(server)).values()
        status, text = ask(one, "POST", "/v2/systemsharedmemory/region/fe/register",
                           json.dumps({"key": PREFIX + "fe", "offset": 0,
                                       "byte_size": tensor.nbytes}).encode())
        assert status == 200, text
        for connection in (other, one, other):
            status, text = ask(connection, "POST", path, body)
            assert status == 200, text
        assert json.loads(ask(other, "GET", "/v2/systemsharedmemory/status")[1]) == [
            {"name": "fe", "key": PREFIX + "fe", "offset": 0, "byte_size": tensor.nbytes}]
        assert ask(other, "POST", "/v2/systemsharedmemory/unregister")[0] == 200
        status, text = ask(one, "POST", path, body)
        assert status == 404 and b"Unable to find" in text, text
