"""The Open Inference Protocol (KServe v2) on a real server, driven by the real tritonclient
(sync and async), and its JSON checked against the protocol's REST spec."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from app.exact import open_rgb, prepare_exact
from tests.helpers import Server, encode, render_scene, run_server

MODEL = "dfine_n_shapes"
IMAGES = [encode(render_scene(seed)[0]) for seed in (60, 61, 62)]


def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"))


def official(server: Server, data: bytes) -> dict[str, np.ndarray]:
    """The same image through /detect, all 300 detections, unclipped."""
    found = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                       params={"score_threshold": 0, "max_detections": 300, "clip": "false"},
                       headers={"Content-Type": "image/jpeg"}).json()["detections"]
    return {"labels": np.asarray([d["class_id"] for d in found]),
            "scores": np.asarray([d["score"] for d in found]),
            "boxes": np.asarray([list(d["box"].values()) for d in found])}


def bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.asarray(images, dtype=np.object_))  # binary, by default
    return tensor


def assert_matches(labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                   want: dict[str, np.ndarray]) -> None:
    assert labels.shape == (300,) and boxes.shape == (300, 4)
    assert labels[:20].tolist() == want["labels"][:20].tolist()
    np.testing.assert_allclose(scores, want["scores"], atol=1e-5)
    np.testing.assert_allclose(boxes[:20], want["boxes"][:20], atol=0.011)


def test_health_and_metadata_through_tritonclient(server: Server) -> None:
    triton_client = client(server)
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert triton_client.get_server_metadata()["name"] == "dfine-serve"
    metadata = triton_client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        "image": "BYTES", "images": "FP32", "orig_target_sizes": "INT64"}
    assert [o["name"] for o in metadata["outputs"]] == ["labels", "boxes", "scores", "names"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton_client.get_model_metadata("resnet50")


def test_bytes_input_gives_the_official_outputs_and_the_names(server: Server) -> None:
    result = client(server).infer(MODEL, [bytes_input(IMAGES[:2])])
    labels, boxes, scores = (result.as_numpy(n) for n in ("labels", "boxes", "scores"))
    assert labels.shape == (2, 300) and boxes.shape == (2, 300, 4) and scores.shape == (2, 300)
    for k in range(2):
        assert_matches(labels[k], boxes[k], scores[k], official(server, IMAGES[k]))
    names = result.as_numpy("names")
    assert names.shape == (2, 300)
    assert {n.decode() if isinstance(n, bytes) else n for n in names[0, :5]} <= {
        "circle", "rectangle", "triangle"}


def test_preprocessed_fp32_input_gives_what_the_file_gives(server: Server) -> None:
    prepared = prepare_exact(open_rgb(IMAGES[2], 50_000_000), 320, 320)
    images = triton.InferInput("images", [1, 3, 320, 320], "FP32")
    images.set_data_from_numpy(prepared.pixels[None])
    sizes = triton.InferInput("orig_target_sizes", [1, 2], "INT64")
    sizes.set_data_from_numpy(np.asarray([prepared.target_size_wh], np.int64))
    outputs = [triton.InferRequestedOutput("labels"), triton.InferRequestedOutput("scores"),
               triton.InferRequestedOutput("boxes")]
    result = client(server).infer(MODEL, [images, sizes], outputs=outputs)
    assert result.as_numpy("names") is None  # only what was asked for
    assert_matches(result.as_numpy("labels")[0], result.as_numpy("boxes")[0],
                   result.as_numpy("scores")[0], official(server, IMAGES[2]))


def test_async_client_under_concurrency(server: Server) -> None:
    async def run() -> list[np.ndarray]:
        async_client = triton_aio.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            results = await asyncio.gather(*(
                async_client.infer(MODEL, [bytes_input([IMAGES[k % 3]])]) for k in range(16)))
        finally:
            await async_client.close()
        return [r.as_numpy("scores")[0] for r in results]

    scores = asyncio.run(run())
    want = [official(server, data)["scores"] for data in IMAGES]
    for k, got in enumerate(scores):
        np.testing.assert_allclose(got, want[k % 3], atol=1e-4)


def test_json_requests_and_answers_follow_the_rest_spec(server: Server) -> None:
    body = {"id": "req-7", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                       "data": [base64.b64encode(IMAGES[0]).decode()]}],
            "outputs": [{"name": "scores"}, {"name": "labels"}]}
    answer = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["model_name"] == MODEL and result["id"] == "req-7"
    for tensor in result["outputs"]:
        assert set(tensor) >= {"name", "datatype", "shape", "data"}
        assert len(tensor["data"]) == int(np.prod(tensor["shape"]))
    assert [t["name"] for t in result["outputs"]] == ["scores", "labels"]
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    # Errors are {"error": "<message>"} on these routes.
    for bad in ({"inputs": "nope"}, {"inputs": [{"name": "image", "datatype": "BYTES",
                                                 "shape": [2], "data": ["AAAA"]}]},
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                             "data": ["not base64!"]}]}):
        refused = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=bad, timeout=30)
        assert refused.status_code == 422 and isinstance(refused.json()["error"], str)
    junk = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", timeout=30, json={
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]})
    assert junk.status_code == 400 and "image" in junk.json()["error"]
    missing = httpx.get(f"{server.url}/v2/models/other")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def test_the_api_key_applies_to_the_protocol_too(tmp_path: Path) -> None:
    with run_server(tmp_path, "--api-key", "k") as srv:
        refused = httpx.get(f"{srv.url}/v2/models/{MODEL}")
        assert refused.status_code == 401 and isinstance(refused.json()["error"], str)
        keyed = triton.InferenceServerClient(url=srv.url.removeprefix("http://"))
        assert keyed.get_model_metadata(MODEL, headers={"X-API-Key": "k"})["name"] == MODEL
