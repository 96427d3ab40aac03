"""Error codes that need their own server (auth, engine failure, overload, deadlines); the
input corpus (test_input_corpus.py) covers the rest of DESIGN §2 on the shared server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np

from tests import onnx_models
from tests.helpers import encode, render_scene, run_server

GOOD = encode(render_scene(42)[0])


def post_raw(url: str, data: bytes, content_type: str = "image/jpeg",
             headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url, content=data, timeout=30,
                      headers={"Content-Type": content_type, **(headers or {})})


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in response.text and "/work/" not in response.text


def test_api_key_and_engine_failure(tmp_path: Path) -> None:
    model = onnx_models.official(tmp_path / "faulty.onnx", faulty=True, labels=["a", "b"])
    with run_server(tmp_path, "--model-path", str(model), "--api-key", "s3cret") as srv:
        image = encode(np.zeros((20, 30, 3), np.uint8))
        assert_error(post_raw(f"{srv.url}/detect", image), 401, "unauthorized")
        assert_error(post_raw(f"{srv.url}/detect", image, headers={"X-API-Key": "wrong"}),
                     401, "unauthorized")
        bearer = {"Authorization": "Bearer s3cret"}
        ok = post_raw(f"{srv.url}/detect", image, headers=bearer)
        assert ok.status_code == 200 and ok.json()["detections"][0]["label"] == "b"
        wide = encode(np.zeros((10, onnx_models.FAIL_WIDTH + 10, 3), np.uint8))
        failed = post_raw(f"{srv.url}/detect", wide, headers={"X-API-Key": "s3cret"})
        assert_error(failed, 500, "internal")
        assert "Gather" not in failed.text  # no internals
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        again = post_raw(f"{srv.url}/detect", image, headers={"X-API-Key": "s3cret"})
        assert again.status_code == 200
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # open without a key
        assert httpx.get(f"{srv.url}/model").status_code == 401


def flood(url: str, count: int) -> list[httpx.Response]:
    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*(
                http.post(f"{url}/detect", content=GOOD, headers={"Content-Type": "image/jpeg"})
                for _ in range(count)))

    return asyncio.run(send_all())


def first_refusal(responses: list[httpx.Response], status: int, code: str) -> httpx.Response:
    """Some of a flood answered, the rest refused with ``status`` and ``code``, nothing else."""
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, status} and 200 in statuses, statuses
    refused = [r for r in responses if r.status_code == status]
    assert refused, statuses
    assert_error(refused[0], status, code)
    return refused[0]


def test_full_queue_gets_503_overloaded_with_retry_after(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-queue", "2", "--max-batch-size", "1") as srv:
        overloaded = first_refusal(flood(srv.url, 40), 503, "overloaded")
        assert int(overloaded.headers["Retry-After"]) >= 1
        assert post_raw(f"{srv.url}/detect", GOOD).status_code == 200


def test_requests_whose_deadline_passes_in_the_queue_get_504(tmp_path: Path) -> None:
    # One image a run, ~15-40 ms each: the later of 12 queued requests wait past 60 ms.
    with run_server(tmp_path, "--max-batch-size", "1", "--request-timeout-s", "0.06") as srv:
        first_refusal(flood(srv.url, 12), 504, "timeout")
        assert post_raw(f"{srv.url}/detect", GOOD).status_code == 200
