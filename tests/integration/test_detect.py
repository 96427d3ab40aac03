"""The default model behind a real server: detections, request forms, batching, metrics."""

from __future__ import annotations

import base64
from typing import Any

import cv2
import httpx
import numpy as np

from app.bench.stats import metric_value
from tests.helpers import (
    Server,
    assert_same_detections,
    box_iou,
    detect_concurrently,
    encode,
    render_scene,
)

SEEDS = list(range(100, 112))


def matches(truth: list[tuple[str, tuple[float, ...]]], found: list[dict[str, Any]]
            ) -> tuple[int, int]:
    """(truth shapes found with IoU >= 0.5 and the right label, confident false positives)."""
    boxes = [(d["label"], tuple(d["box"].values()), d["score"]) for d in found]
    hits = sum(any(lab == t_lab and box_iou(box, t_box) >= 0.5 for lab, box, _ in boxes)
               for t_lab, t_box in truth)
    wrong = sum(score >= 0.8 and not any(lab == t_lab and box_iou(box, t_box) >= 0.5
                                         for t_lab, t_box in truth)
                for lab, box, score in boxes)
    return hits, wrong


def test_detect_finds_the_shapes_of_rendered_images(server: Server) -> None:
    total = hits = wrong = 0
    for seed in SEEDS:
        image, truth = render_scene(seed)
        response = httpx.post(f"{server.url}/detect", files={"image": ("x.png", encode(
            image, ".png"), "image/png")}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image"] == {"width": image.shape[1], "height": image.shape[0]}
        scores = [d["score"] for d in body["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in body["detections"]:
            b = d["box"]
            assert 0 <= b["x1"] <= b["x2"] <= image.shape[1]
            assert 0 <= b["y1"] <= b["y2"] <= image.shape[0]
        found, bad = matches(truth, body["detections"])
        total, hits, wrong = total + len(truth), hits + found, wrong + bad
        assert set(body["timing_ms"]) == {"queue", "preprocess", "inference", "total"}
    print(f"recall {hits}/{total}, confident false positives {wrong}")
    assert hits >= 0.85 * total
    assert wrong <= 0.1 * total


def test_raw_body_and_multipart_give_the_same_answer(server: Server) -> None:
    image, _ = render_scene(5)
    data = encode(image)
    raw = httpx.post(f"{server.url}/detect", content=data,
                     headers={"Content-Type": "image/jpeg"}, timeout=30).json()
    octet = httpx.post(f"{server.url}/detect", content=data,
                       headers={"Content-Type": "application/octet-stream"}, timeout=30).json()
    multi = httpx.post(f"{server.url}/detect", files={"image": ("a.jpg", data, "image/jpeg")},
                       timeout=30).json()
    assert raw["detections"] == multi["detections"] == octet["detections"]
    assert raw["detections"]


def test_json_base64_body_gives_the_raw_bodys_answer(server: Server) -> None:
    data = encode(render_scene(9)[0])
    raw = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                     headers={"Content-Type": "image/jpeg"}).json()
    text = base64.b64encode(data).decode()
    for image in (text, "data:image/jpeg;base64," + text):
        answer = httpx.post(f"{server.url}/detect", json={"image": image}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert_same_detections(answer.json()["detections"], raw["detections"])
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "application/json" in schema["paths"]["/detect"]["post"]["requestBody"]["content"]


def test_query_parameters_filter_detections(server: Server) -> None:
    image, _ = render_scene(7)
    data = encode(image)
    url = f"{server.url}/detect"
    everything = httpx.post(url, content=data, params={"score_threshold": 0},
                            headers={"Content-Type": "image/jpeg"}, timeout=30).json()
    assert len(everything["detections"]) == 100  # the default max_detections
    two = httpx.post(url, content=data, params={"score_threshold": 0, "max_detections": 2},
                     headers={"Content-Type": "image/jpeg"}, timeout=30).json()
    assert two["detections"] == everything["detections"][:2]
    circles = httpx.post(url, content=data, params={"score_threshold": 0, "classes": "circle,2"},
                         headers={"Content-Type": "image/jpeg"}, timeout=30).json()
    assert {d["label"] for d in circles["detections"]} <= {"circle", "triangle"}


def test_batch_endpoint_equals_single_calls(server: Server) -> None:
    images = [encode(render_scene(seed)[0]) for seed in (1, 2, 3)]
    batch = httpx.post(f"{server.url}/detect/batch", timeout=30,
                       files=[("images", (f"{i}.jpg", d, "image/jpeg"))
                              for i, d in enumerate(images)])
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    singles = [httpx.post(f"{server.url}/detect", content=d, timeout=30,
                          headers={"Content-Type": "image/jpeg"}).json() for d in images]
    for result, single in zip(results, singles, strict=True):
        assert_same_detections(result["detections"], single["detections"])
    assert [r["image"] for r in results] == [s["image"] for s in singles]


def test_a_bad_image_in_a_batch_gets_its_own_error_and_the_others_their_answers(
        server: Server) -> None:
    good = encode(render_scene(2)[0])
    parts = [("images", (f"{i}.jpg", data, "image/jpeg"))
             for i, data in enumerate([good, b"junk", good, b"P4\n9 9\n"])]
    response = httpx.post(f"{server.url}/detect/batch", files=parts, timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[1] == {"index": 1, "error": {
        "code": "invalid_image", "message": results[1]["error"]["message"]}}
    assert results[3]["error"]["code"] == "unsupported_media_type"
    assert results[0]["detections"]  # the same image twice: the same answer, to float noise
    assert_same_detections(results[0]["detections"], results[2]["detections"])


def test_32_concurrent_clients_get_correct_answers_in_batches(server: Server) -> None:
    images = [encode(render_scene(seed)[0]) for seed in range(200, 208)]
    expected = [httpx.post(f"{server.url}/detect", content=d, timeout=30,
                           headers={"Content-Type": "image/jpeg"}).json()["detections"]
                for d in images]
    before = httpx.get(f"{server.url}/metrics").text
    answers = detect_concurrently(server.url, images, 32)
    for k, answer in enumerate(answers):
        assert_same_detections(answer, expected[k % 8])
    after = httpx.get(f"{server.url}/metrics").text
    images_run = (metric_value(after, "dfine_images_total")
                  - metric_value(before, "dfine_images_total"))
    batches = (metric_value(after, "dfine_batch_size_count")
               - metric_value(before, "dfine_batch_size_count"))
    print(f"32 requests in {batches:.0f} engine runs: average batch {images_run / batches:.2f}")
    assert images_run == 32
    assert images_run / batches > 1


def test_model_endpoint_and_openapi_describe_the_service(server: Server) -> None:
    model = httpx.get(f"{server.url}/model").json()
    assert model["classes"] == ["circle", "rectangle", "triangle"]
    assert model["input_size"] == {"width": 320, "height": 320}
    assert model["providers"] == ["CPUExecutionProvider"]
    assert model["batching"]["max_batch_size"] == 8
    schema = httpx.get(f"{server.url}/openapi.json").json()
    detect = schema["paths"]["/detect"]["post"]
    assert {"200", "400", "401", "413", "415", "422", "500", "503", "504"} <= set(
        detect["responses"])
    assert set(detect["requestBody"]["content"]) == {"multipart/form-data", "image/*",
                                                     "application/octet-stream",
                                                     "application/json"}
    assert httpx.get(f"{server.url}/docs").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'dfine_model_info{' in metrics and 'providers="CPUExecutionProvider"' in metrics


def test_render_returns_the_image_with_the_boxes_drawn(server: Server) -> None:
    image, _ = render_scene(12)
    data = encode(image, ".png")
    detections = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                            headers={"Content-Type": "image/png"}).json()["detections"]
    assert detections
    jpeg = httpx.post(f"{server.url}/detect/render", content=data, timeout=30,
                      headers={"Content-Type": "image/png"})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert int(jpeg.headers["X-Detections"]) == len(detections)
    png = httpx.post(f"{server.url}/detect/render", content=data, timeout=30,
                     headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    by_query = httpx.post(f"{server.url}/detect/render?format=png&score_threshold=0.99",
                          content=data, timeout=30, headers={"Content-Type": "image/png"})
    assert by_query.headers["content-type"] == "image/png"
    drawn = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR)
    assert drawn.shape == image.shape
    # Pixels change along every box's edge, and the image is untouched far from the boxes.
    changed = np.abs(drawn.astype(int) - image.astype(int)).sum(axis=2) > 60
    for d in detections:
        x1, _, x2, y2 = (int(v) for v in d["box"].values())
        edge = changed[min(y2, image.shape[0] - 1) - 1, x1:x2]
        assert edge.mean() > 0.5, d
    assert changed.mean() < 0.5
    bad = httpx.post(f"{server.url}/detect/render", content=b"junk", timeout=30,
                     headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
