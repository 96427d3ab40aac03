"""Photos the right way up, on real servers in both preprocessing modes: each of the eight EXIF
orientations comes back with the upright size and the upright scene's boxes through /detect,
/detect/render and /v2; orientation=stored keeps the official frame; a bad tag is ignored."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from models.synthetic import CLASSES
from tests.helpers import Server, box_iou, run_server
from tests.orientation_images import alike, stored_jpeg, upright_scene

ORIENTATIONS = range(1, 9)


@pytest.fixture(scope="module", params=["exact", "fast"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp(request.param), "--preprocess",
                    request.param) as server:
        yield server


def detect(server: Server, data: bytes, **params: str) -> httpx.Response:
    return httpx.post(f"{server.url}/detect", content=data, params=params, timeout=30,
                      headers={"Content-Type": "image/jpeg"})


def hits(found: list[tuple[str, tuple[float, ...]]],
         truth: list[tuple[str, tuple[float, ...]]]) -> int:
    return sum(any(label == t_label and box_iou(box, t_box) >= 0.5 for label, box in found)
               for t_label, t_box in truth)


def assert_upright_answer(body: dict[str, object]) -> None:
    image, truth = upright_scene()
    assert body["image"] == {"width": image.shape[1], "height": image.shape[0]}
    found = [(d["label"], tuple(d["box"].values())) for d in body["detections"]]  # type: ignore[attr-defined]
    assert hits(found, truth) >= 0.8 * len(truth), (hits(found, truth), len(truth))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_detect_answers_in_the_upright_frame(served: Server, orientation: int) -> None:
    response = detect(served, stored_jpeg(orientation))
    assert response.status_code == 200, response.text
    assert_upright_answer(response.json())


@pytest.mark.parametrize("orientation", [3, 6])
def test_orientation_stored_keeps_the_official_frame(served: Server, orientation: int) -> None:
    image = upright_scene()[0]
    body = detect(served, stored_jpeg(orientation), orientation="stored").json()
    h, w = image.shape[:2]
    assert body["image"] == ({"width": h, "height": w} if orientation >= 5
                             else {"width": w, "height": h})
    assert detect(served, b"x", orientation="sideways").status_code == 422


def test_an_invalid_orientation_tag_is_ignored(served: Server) -> None:
    for bad in (0, 9, 200):
        response = detect(served, stored_jpeg(1, tag=bad))
        assert response.status_code == 200, response.text
        assert_upright_answer(response.json())


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_render_draws_on_the_upright_photo(served: Server, orientation: int) -> None:
    response = httpx.post(f"{served.url}/detect/render", content=stored_jpeg(orientation),
                          params={"format": "png", "score_threshold": "1"}, timeout=30,
                          headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    drawn = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert alike(drawn, upright_scene()[0])  # threshold 1: nothing drawn over it


def test_v2_infer_answers_in_the_upright_frame(served: Server) -> None:
    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    images = [stored_jpeg(k) for k in ORIENTATIONS]
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.asarray(images, dtype=np.object_))
    result = client.infer("dfine_n_shapes", [tensor])
    labels, boxes, scores = (result.as_numpy(n) for n in ("labels", "boxes", "scores"))
    truth = upright_scene()[1]
    for k in range(len(images)):
        found = [(CLASSES[int(c)], tuple(map(float, b)))
                 for c, b, s in zip(labels[k], boxes[k], scores[k]) if s >= 0.5]
        assert hits(found, truth) >= 0.8 * len(truth), (k + 1, hits(found, truth))
