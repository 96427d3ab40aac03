"""The Open Inference Protocol over gRPC, with the real clients (tritonclient.grpc, sync and
aio; the standard health checking stub) against real servers, checked against the REST form's
answers; and REST's binary outputs against its JSON ones."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.bench.cli import free_port
from app.bench.stats import metric_value
from tests.helpers import Server, encode, render_scene, run_server, wait_until, wait_until_async

MODEL = "dfine_n_shapes"


class Running:
    def __init__(self, server: Server, grpc_port: int) -> None:
        self.server, self.grpc = server, f"127.0.0.1:{grpc_port}"
        self.http = server.url.removeprefix("http://")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    port = free_port()
    with run_server(tmp_path_factory.mktemp("grpc"), "--grpc-port", str(port),
                    "--max-batch-size", "4", "--max-upload-bytes", "2000000") as server:
        yield Running(server, port)


def _images(*seeds: int) -> np.ndarray:
    return np.asarray([encode(render_scene(s)[0]) for s in seeds], dtype=object)


def _bytes_input(module: object, images: np.ndarray) -> object:
    tensor = module.InferInput("image", [len(images)], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(images)
    return tensor


def test_live_ready_and_metadata_as_rest_says(running: Running) -> None:
    client = tgrpc.InferenceServerClient(running.grpc)
    rest = thttp.InferenceServerClient(running.http)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready(MODEL, "7")
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["versions"] == ["1"]
    rest_metadata = rest.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{**t, "shape": [str(d) for d in t["shape"]]}
                                  for t in rest_metadata["inputs"]]
    assert [o["name"] for o in metadata["outputs"]] == ["labels", "boxes", "scores", "names"]
    assert client.get_server_metadata().name == "dfine-serve"


def test_infer_of_two_images_equals_the_rest_answer(running: Running) -> None:
    images = _images(3, 4)
    over_grpc = tgrpc.InferenceServerClient(running.grpc).infer(
        MODEL, [_bytes_input(tgrpc, images)])
    over_rest = thttp.InferenceServerClient(running.http).infer(
        MODEL, [_bytes_input(thttp, images)])
    for name in ("labels", "boxes", "scores", "names"):
        got, want = over_grpc.as_numpy(name), over_rest.as_numpy(name)
        assert got.shape == want.shape and got.shape[0] == 2, name
        if name in ("labels", "names"):
            assert (got[:, :10] == want[:, :10]).all(), name
        else:
            np.testing.assert_allclose(got[:, :10], want[:, :10], atol=1e-3)
    assert over_grpc.get_response().model_version == "1"


def test_preprocessed_fp32_input_and_requested_outputs(running: Running) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((1, 3, 320, 320), dtype=np.float32)  # the model's input
    sizes = np.asarray([[1280, 720]], np.int64)
    results = []
    for module in (tgrpc, thttp):
        images = module.InferInput("images", list(pixels.shape), "FP32")
        images.set_data_from_numpy(pixels)
        target = module.InferInput("orig_target_sizes", [1, 2], "INT64")
        target.set_data_from_numpy(sizes)
        client = module.InferenceServerClient(
            running.grpc if module is tgrpc else running.http)
        results.append(client.infer(MODEL, [images, target],
                                    outputs=[module.InferRequestedOutput("scores"),
                                             module.InferRequestedOutput("boxes")]))
    grpc_result, rest_result = results
    assert [o.name for o in grpc_result.get_response().outputs] == ["scores", "boxes"]
    assert grpc_result.as_numpy("labels") is None
    np.testing.assert_allclose(grpc_result.as_numpy("scores"), rest_result.as_numpy("scores"),
                               atol=1e-4)
    assert grpc_result.as_numpy("boxes")[0, :, 2].max() > 320  # in the 1280x720 frame


@pytest.mark.parametrize(("call", "code", "text"), [
    (lambda c, i: c.infer("nope", [i]), grpc.StatusCode.NOT_FOUND, "unknown model"),
    (lambda c, i: c.infer(MODEL, [i], model_version="abc"), grpc.StatusCode.NOT_FOUND,
     "unknown version"),
    (lambda c, i: c.infer(MODEL, [i], outputs=[tgrpc.InferRequestedOutput("logits")]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
    (lambda c, i: c.get_model_metadata("nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
])
def test_errors_carry_grpc_status_codes(running: Running, call: object,
                                        code: grpc.StatusCode, text: str) -> None:
    client = tgrpc.InferenceServerClient(running.grpc)
    with pytest.raises(InferenceServerException) as raised:
        call(client, _bytes_input(tgrpc, _images(3)))  # type: ignore[operator]
    assert raised.value.status() == str(code) and text in raised.value.message()


def test_bad_images_and_oversized_messages_are_refused_and_serving_goes_on(
        running: Running) -> None:
    client = tgrpc.InferenceServerClient(running.grpc)
    garbage = _bytes_input(tgrpc, np.asarray([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [garbage])
    assert raised.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    # One image over MAX_UPLOAD_BYTES (2 MB here), in a message within gRPC's limit.
    big = _bytes_input(tgrpc, np.asarray([b"\xff" * 2_500_000], dtype=object))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [big])
    assert raised.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    # A message over the gRPC limit (MAX_BATCH_IMAGES x MAX_UPLOAD_BYTES): refused by gRPC.
    huge = _bytes_input(tgrpc, np.asarray([b"\xff" * 34_000_000], dtype=object))
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [huge])
    assert raised.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert client.infer(MODEL, [_bytes_input(tgrpc, _images(3))]).as_numpy("scores") is not None


def test_sixteen_concurrent_streams_of_requests_all_answered(running: Running) -> None:
    images = _images(3)

    async def stream(client: tgrpc_aio.InferenceServerClient) -> list[float]:
        best = []
        for _ in range(4):
            result = await client.infer(MODEL, [_bytes_input(tgrpc_aio, images)])
            best.append(float(result.as_numpy("scores")[0, 0]))
        return best

    async def all_streams() -> list[list[float]]:
        clients = [tgrpc_aio.InferenceServerClient(running.grpc) for _ in range(16)]
        try:
            return await asyncio.gather(*(stream(c) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    before = metric_value(_metrics(running), 'dfine_requests_total{endpoint="grpc:ModelInfer",'
                                             'status="200"}')
    scores = [s for row in asyncio.run(all_streams()) for s in row]
    assert len(scores) == 64 and max(scores) - min(scores) < 1e-3
    after = _metrics(running)
    assert metric_value(after, 'dfine_requests_total{endpoint="grpc:ModelInfer",'
                               f'status="200",model="{MODEL}",version="1"}}') - before == 64
    assert metric_value(after, f'dfine_batch_size_count{{model="{MODEL}"}}') > 0


def _metrics(running: Running) -> str:
    return httpx.get(f"{running.server.url}/metrics", timeout=10).text


def _serving(address: str, service: str = "", timeout_s: float = 15) -> bool:
    """Whether the health service says SERVING within ``timeout_s`` (it follows readiness
    every 0.2 s); fails naming the service otherwise."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

        return wait_until(serving, timeout_s, f"the health service SERVING {service!r}", 0.1)


def test_the_health_service_answers_for_probes(running: Running) -> None:
    assert _serving(running.grpc) and _serving(running.grpc, "inference.GRPCInferenceService")


def test_rest_binary_outputs_equal_the_json_ones(running: Running) -> None:
    client = thttp.InferenceServerClient(running.http)
    images = _images(3, 5)
    names = ("labels", "boxes", "scores", "names")
    as_json = client.infer(MODEL, [_bytes_input(thttp, images)],
                           outputs=[thttp.InferRequestedOutput(n, binary_data=False)
                                    for n in names])
    as_binary = client.infer(MODEL, [_bytes_input(thttp, images)],
                             outputs=[thttp.InferRequestedOutput(n, binary_data=True)
                                      for n in names])
    for name in names:
        assert as_binary.get_output(name)["parameters"]["binary_data_size"] > 0
        assert "data" in as_json.get_output(name)
        got, want = as_binary.as_numpy(name), as_json.as_numpy(name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if name == "names":  # tritonclient gives JSON's BYTES as text, binary ones as bytes
            want = np.vectorize(str.encode, otypes=[object])(want)
        # Two runs (batched alike or not): equal to float noise, where far-down detections of
        # near-equal scores may trade places; the first 20 are well apart.
        if got.dtype == np.float32:
            np.testing.assert_allclose(got[:, :20], want[:, :20], atol=1e-3)
        else:
            assert (got[:, :20] == want[:, :20]).all(), name


def test_api_key_repository_calls_and_draining_over_grpc(tmp_path: Path) -> None:
    port = free_port()
    with run_server(tmp_path, "--grpc-port", str(port), "--api-key", "k",
                    "--control-api-key", "c", "--model-control", "explicit") as server:
        address = f"127.0.0.1:{port}"
        client = tgrpc.InferenceServerClient(address)
        with pytest.raises(InferenceServerException) as raised:
            client.is_server_ready()
        assert raised.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        with pytest.raises(InferenceServerException):
            client.is_server_ready(headers={"authorization": "Bearer wrong"})
        key = {"authorization": "Bearer k"}
        assert client.is_server_ready(headers=key)
        assert client.is_server_ready(headers={"x-api-key": "k"})
        assert _serving(address)  # probes need no key

        index = client.get_model_repository_index(headers=key, as_json=True)["models"]
        assert [(m["name"], m["version"], m["state"]) for m in index] == [(MODEL, "1", "READY")]
        control = {"authorization": "Bearer c"}
        client.unload_model(MODEL, headers=control)
        with pytest.raises(InferenceServerException) as raised:
            client.infer(MODEL, [_bytes_input(tgrpc, _images(3))], headers=key)
        assert raised.value.status() == str(grpc.StatusCode.NOT_FOUND)
        client.load_model(MODEL, headers=control)
        assert client.is_model_ready(MODEL, headers=key)

        # SIGTERM while a call of 8 images runs: it is answered, then the process exits 0.
        async def call_then_stop() -> object:
            aio = tgrpc_aio.InferenceServerClient(address)
            http = httpx.AsyncClient(timeout=30, headers={"X-API-Key": "k"})

            async def images_seen() -> float:  # queued or run
                text = (await http.get(f"{server.url}/metrics")).text
                return metric_value(text, "dfine_images_total") + metric_value(
                    text, "dfine_queue_depth")

            async def call_begun() -> bool:
                return await images_seen() > before

            try:
                before = await images_seen()
                pending = asyncio.ensure_future(aio.infer(
                    MODEL, [_bytes_input(tgrpc_aio, _images(*range(8)))], headers=key))
                # One image a run here (CPU): once one is queued or run, the rest take
                # several runs more.
                await wait_until_async(call_begun, 60, "the call's images in the queue or run")
                server.process.send_signal(signal.SIGTERM)
                return await pending
            finally:
                await aio.close()
                await http.aclose()

        result = asyncio.run(call_then_stop())
        assert result.as_numpy("scores").shape == (8, 300)  # type: ignore[attr-defined]
        assert server.process.wait(30) == 0


def test_typed_contents_are_read_as_raw_ones_are(running: Running) -> None:
    """Inputs in InferTensorContents (bytes_contents, fp32_contents, int64_contents) instead
    of raw_input_contents, through the generated stub itself."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    image = encode(render_scene(3)[0])
    raw = tgrpc.InferenceServerClient(running.grpc).infer(
        MODEL, [_bytes_input(tgrpc, np.asarray([image], dtype=object))])
    with grpc.insecure_channel(running.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(image)
        typed = stub.ModelInfer(request, timeout=30)
        scores = np.frombuffer(typed.raw_output_contents[2], "<f4").reshape(1, 300)
        np.testing.assert_allclose(scores[:, :10], raw.as_numpy("scores")[:, :10], atol=1e-3)

        pixels = np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)
        request = pb.ModelInferRequest(model_name=MODEL)
        images = request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 320, 320])
        images.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
        sizes = request.inputs.add(name="orig_target_sizes", datatype="INT64", shape=[1, 2])
        sizes.contents.int64_contents.extend([640, 480])
        answer = stub.ModelInfer(request, timeout=30)
        assert [o.name for o in answer.outputs] == ["labels", "boxes", "scores", "names"]
        assert list(answer.outputs[1].shape) == [1, 300, 4]

        wrong = pb.ModelInferRequest(model_name=MODEL)
        short = wrong.inputs.add(name="images", datatype="FP32", shape=[1, 3, 320, 320])
        short.contents.fp32_contents.extend([0.5] * 10)  # 10 values for a shape of 307,200
        with pytest.raises(grpc.RpcError) as raised:
            stub.ModelInfer(wrong, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
