"""Every error code of DESIGN §2 from a real request; the service answers the next good one."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import onnx_models
from tests.helpers import Server, encode, render_scene, run_server

GOOD = encode(render_scene(42)[0])
PNG_BOMB = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
            + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0) + b"\0\0\0\0")


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


def chunks(total: int) -> object:
    def generate() -> object:
        for _ in range(total // 65536):
            yield b"\0" * 65536
    return generate()


CASES: dict[str, tuple[Callable[[str], httpx.Response], int, str]] = {
    "zero bytes": (lambda u: post_raw(f"{u}/detect", b""), 400, "invalid_image"),
    "random bytes": (lambda u: post_raw(f"{u}/detect", bytes(range(256)) * 40), 400,
                     "invalid_image"),
    "truncated jpeg": (lambda u: post_raw(f"{u}/detect", GOOD[: len(GOOD) // 3]), 400,
                       "invalid_image"),
    "declared too large": (lambda u: post_raw(f"{u}/detect", b"\0" * (21 * 1024 * 1024)), 413,
                           "payload_too_large"),
    "chunked too large": (lambda u: httpx.post(f"{u}/detect", content=chunks(22 * 1024 * 1024),
                                               headers={"Content-Type": "image/jpeg"},
                                               timeout=30), 413, "payload_too_large"),
    "pixel bomb": (lambda u: post_raw(f"{u}/detect", PNG_BOMB, "image/png"), 413,
                   "image_too_large"),
    "wrong content type": (lambda u: post_raw(f"{u}/detect", GOOD, "text/plain"), 415,
                           "unsupported_media_type"),
    "no content type": (lambda u: httpx.post(f"{u}/detect", content=GOOD, timeout=30), 415,
                        "unsupported_media_type"),
    "missing part": (lambda u: httpx.post(f"{u}/detect", files={"other": ("a.jpg", GOOD)},
                                          timeout=30), 422, "invalid_request"),
    "two parts": (lambda u: httpx.post(f"{u}/detect", files=[("image", ("a.jpg", GOOD)),
                                                             ("image", ("b.jpg", GOOD))],
                                       timeout=30), 422, "invalid_request"),
    "threshold out of range": (lambda u: post_raw(f"{u}/detect?score_threshold=2", GOOD), 422,
                               "invalid_request"),
    "malformed max_detections": (lambda u: post_raw(f"{u}/detect?max_detections=lots", GOOD),
                                 422, "invalid_request"),
    "unknown class": (lambda u: post_raw(f"{u}/detect?classes=unicorn", GOOD), 422,
                      "invalid_request"),
    "batch not multipart": (lambda u: post_raw(f"{u}/detect/batch", GOOD), 415,
                            "unsupported_media_type"),
    "unknown path": (lambda u: httpx.get(f"{u}/nowhere"), 404, "not_found"),
    "wrong method": (lambda u: httpx.get(f"{u}/detect"), 405, "method_not_allowed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_its_error_and_the_next_good_one_works(server: Server,
                                                                 case: str) -> None:
    send, status, code = CASES[case]
    assert_error(send(server.url), status, code)
    good = post_raw(f"{server.url}/detect", GOOD)
    assert good.status_code == 200 and good.json()["detections"]


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


def test_full_queue_gets_503_overloaded_with_retry_after(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-queue", "2", "--max-batch-size", "1") as srv:
        responses = flood(srv.url, 40)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
        overloaded = [r for r in responses if r.status_code == 503]
        assert overloaded, statuses
        assert_error(overloaded[0], 503, "overloaded")
        assert int(overloaded[0].headers["Retry-After"]) >= 1
        assert post_raw(f"{srv.url}/detect", GOOD).status_code == 200


def test_requests_whose_deadline_passes_in_the_queue_get_504(tmp_path: Path) -> None:
    # One image a run, ~15-40 ms each: the later of 12 queued requests wait past 60 ms.
    with run_server(tmp_path, "--max-batch-size", "1", "--request-timeout-s", "0.06") as srv:
        responses = flood(srv.url, 12)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 504} and 200 in statuses, statuses
        late = [r for r in responses if r.status_code == 504]
        assert late, statuses
        assert_error(late[0], 504, "timeout")
        assert post_raw(f"{srv.url}/detect", GOOD).status_code == 200
