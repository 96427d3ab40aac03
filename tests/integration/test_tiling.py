"""Tiled inference through a real server (the shipped model, onnxruntime on the CPU): /detect,
/detect/batch, /detect/render and the Open Inference Protocol over REST and gRPC (tritonclient),
with the settings' and a repository model's defaults."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from app.bench.cli import free_port
from app.bench.stats import metric_value
from tests.helpers import (
    DEFAULT_MODEL,
    Server,
    box_iou,
    encode,
    render_scene,
    run_server,
    scrape,
)
from tests.orientation_images import stored_jpeg, upright_scene

JPEG = {"Content-Type": "image/jpeg"}


def _big_scene() -> tuple[bytes, int, int]:
    """A scene twice its size (large shapes, which tile borders cut): JPEG, width, height."""
    image = render_scene(5)[0]
    big = cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2),
                     interpolation=cv2.INTER_LINEAR)
    return encode(big), big.shape[1], big.shape[0]


BIG, BIG_W, BIG_H = _big_scene()


class Running:
    def __init__(self, server: Server, grpc_port: int) -> None:
        self.server, self.url, self.grpc = server, server.url, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    port = free_port()
    with run_server(tmp_path_factory.mktemp("tiling"), "--grpc-port", str(port),
                    "--max-batch-size", "8", "--max-tiles", "16") as server:
        yield Running(server, port)


def _detect(url: str, body: bytes, **query: Any) -> httpx.Response:
    return httpx.post(f"{url}/detect", content=body, headers=JPEG, params=query, timeout=120)


def _boxes(detections: list[dict[str, Any]]) -> list[tuple[str, tuple[float, ...]]]:
    return [(d["label"], (d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]))
            for d in detections]


def test_a_tiled_answer_says_its_tiles_and_they_cover_the_image(running: Running) -> None:
    response = _detect(running.url, BIG, tile=640)
    assert response.status_code == 200, response.text
    body = response.json()
    tiling = body["tiling"]
    assert body["image"] == {"width": BIG_W, "height": BIG_H}
    assert tiling["tile"] == 640 and tiling["overlap"] == 0.2 and tiling["full_image"]
    tiles = tiling["tiles"]
    assert len(tiles) > 1 and tiling["engine_images"] == len(tiles) + 1
    covered = np.zeros((BIG_H, BIG_W), bool)
    for t in tiles:
        assert t["width"] == min(640, BIG_W) and t["height"] == min(640, BIG_H)
        assert 0 <= t["x"] <= BIG_W - t["width"] and 0 <= t["y"] <= BIG_H - t["height"]
        covered[t["y"]:t["y"] + t["height"], t["x"]:t["x"] + t["width"]] = True
    assert covered.all()
    # The tiles entered the batcher together: batches of up to MAX_BATCH_SIZE (8), not one
    # engine run per image.
    assert math.ceil(tiling["engine_images"] / 8) <= tiling["engine_runs"] < (
        tiling["engine_images"])


@pytest.mark.parametrize("merge", ["nms", "greedy_nmm"])
def test_objects_cut_by_tile_borders_come_back_once_at_full_size(running: Running, merge: str
                                                                 ) -> None:
    whole = _boxes(_detect(running.url, BIG, tile="none").json()["detections"])
    tiled = _detect(running.url, BIG, tile=640, tile_merge=merge).json()
    found = _boxes(tiled["detections"])
    tiles = tiled["tiling"]["tiles"]
    cut = 0
    for label, box in whole:  # the untiled run finds the scene's large shapes
        if _nested(box, label, whole):
            continue  # merged into the larger one on intersection-over-smaller: see docs
        inside_one = any(t["x"] <= box[0] and box[2] <= t["x"] + t["width"]
                         and t["y"] <= box[1] and box[3] <= t["y"] + t["height"]
                         for t in tiles)
        cut += not inside_one
        matches = [b for lbl, b in found if lbl == label and box_iou(b, box) > 0.3]
        assert len(matches) == 1, (label, box, matches)
        assert box_iou(matches[0], box) > 0.85, (label, box, matches[0])
    assert cut >= 1, "the scene must have an object no tile holds whole"


def _nested(box: tuple[float, ...], label: str,
            boxes: list[tuple[str, tuple[float, ...]]]) -> bool:
    """Inside a larger box of its class, by half its own area or more."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other_label, other in boxes:
        if other_label != label or other == box:
            continue
        inter = (max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
                 * max(0.0, min(box[3], other[3]) - max(box[1], other[1])))
        if (other[2] - other[0]) * (other[3] - other[1]) > area and inter >= 0.5 * area:
            return True
    return False


def test_auto_leaves_an_image_near_the_input_size_whole(running: Running) -> None:
    image = encode(cv2.resize(render_scene(3)[0], (600, 450)))  # at most 2x the input (320)
    plain = _detect(running.url, image).json()
    auto = _detect(running.url, image, tile="auto").json()
    assert "tiling" not in plain
    assert auto["tiling"]["tile"] is None and auto["tiling"]["tiles"] == []
    assert auto["tiling"]["engine_images"] == 1
    assert auto["detections"] == plain["detections"]


def test_auto_tiles_a_large_image(running: Running) -> None:
    large = encode(cv2.resize(render_scene(5)[0], (2000, 1500)))
    tiling = _detect(running.url, large, tile="auto").json()["tiling"]
    assert tiling["tile"] is not None and 1 < len(tiling["tiles"]) <= 16


@pytest.mark.parametrize("query", [
    {"tile": "10"}, {"tile": "big"}, {"tile": "-640"}, {"tile": "640", "tile_overlap": "0.95"},
    {"tile": "640", "tile_overlap": "-0.1"}, {"tile": "640", "tile_merge": "average"},
    {"tile": "640", "tile_merge_threshold": "0"}, {"tile": "640", "tile_merge_threshold": "1.5"},
    {"tile": "640", "tile_merge_metric": "giou"}, {"tile": "640", "tile_full_image": "maybe"},
])
def test_tiling_parameters_out_of_range_are_422(running: Running, query: dict[str, str]
                                                ) -> None:
    response = _detect(running.url, BIG, **query)
    assert response.status_code == 422, (query, response.text)
    assert _detect(running.url, BIG, tile=640).status_code == 200  # and it keeps serving


def _preprocessed(url: str) -> float:
    return metric_value(scrape(f"{url}/metrics"), "dfine_preprocess_seconds_count") or 0.0


def test_over_max_tiles_is_refused_from_the_header_before_decoding(running: Running) -> None:
    # A JPEG whose header is whole but whose image data is cut off: decoding it would fail
    # (400); the tile count, from the header alone, refuses it first.
    cut_short = BIG[:len(BIG) // 3]
    assert _detect(running.url, cut_short).status_code == 400
    before = _preprocessed(running.url)
    response = _detect(running.url, cut_short, tile=64)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "too_many_tiles"
    assert "MAX_TILES" in response.json()["error"]["message"]
    assert _preprocessed(running.url) == before  # nothing was decoded
    # The whole-image pass is not a tile: the largest grid MAX_TILES allows is served.
    assert _detect(running.url, BIG, tile=320, tile_overlap=0).status_code == 422  # 5 x 4
    assert _detect(running.url, BIG, tile=560, tile_overlap=0).status_code == 200  # 3 x 2


def test_exif_turned_photos_tile_in_the_upright_frame(running: Running) -> None:
    upright = upright_scene()[0]
    height, width = upright.shape[:2]
    turned = stored_jpeg(6)  # stored on its side
    body = _detect(running.url, turned, tile=400, tile_full_image="false").json()
    assert body["image"] == {"width": width, "height": height}
    tiles = body["tiling"]["tiles"]
    assert max(t["x"] + t["width"] for t in tiles) == width
    assert max(t["y"] + t["height"] for t in tiles) == height
    as_stored = _detect(running.url, turned, tile=400, orientation="stored").json()
    assert as_stored["image"] == {"width": height, "height": width}
    # The same windows of the same picture as an upright file's: the same objects.
    upright_body = _detect(running.url, encode(upright), tile=400,
                           tile_full_image="false").json()
    assert upright_body["tiling"]["tiles"] == tiles
    found = _boxes(body["detections"])
    confident = [(lbl, b) for lbl, b in _boxes(upright_body["detections"])
                 if any(d["score"] > 0.7 and _boxes([d])[0][1] == b
                        for d in upright_body["detections"])]
    assert confident
    for label, box in confident:
        assert any(lbl == label and box_iou(b, box) > 0.8 for lbl, b in found), (label, box)


def test_batch_and_render_tile_each_image(running: Running) -> None:
    small = encode(cv2.resize(render_scene(3)[0], (600, 450)))
    response = httpx.post(f"{running.url}/detect/batch", params={"tile": 640}, timeout=120,
                          files=[("images", ("a.jpg", BIG, "image/jpeg")),
                                 ("images", ("b.jpg", small, "image/jpeg"))])
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert len(first["tiling"]["tiles"]) > 1
    assert second["tiling"]["tile"] is None  # one tile would be the whole image
    tiled = _detect(running.url, BIG, tile=640).json()
    assert first["detections"] == tiled["detections"]
    render = httpx.post(f"{running.url}/detect/render", content=BIG, headers=JPEG,
                        params={"tile": 640}, timeout=120)
    assert render.status_code == 200 and render.headers["content-type"] == "image/jpeg"
    assert int(render.headers["x-detections"]) == len(tiled["detections"])


def _official(detections: list[dict[str, Any]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    return ([d["class_id"] for d in detections],
            np.asarray([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in detections],
                       np.float32).reshape(-1, 4),
            np.asarray([d["score"] for d in detections], np.float32))


@pytest.mark.parametrize("client", ["http", "grpc"])
def test_the_open_inference_protocol_takes_tiling_parameters(running: Running, client: str
                                                             ) -> None:
    small = encode(render_scene(3)[0])
    want = [_official(_detect(running.url, image, tile=640).json()["detections"])
            for image in (BIG, small)]
    module: Any = thttp if client == "http" else tgrpc
    triton = (thttp.InferenceServerClient(running.url.removeprefix("http://"))
              if client == "http" else tgrpc.InferenceServerClient(running.grpc))
    files = np.array([BIG, small], dtype=np.object_)
    image_input = module.InferInput("image", [2], "BYTES")
    image_input.set_data_from_numpy(files)
    result = triton.infer("dfine_n_shapes", [image_input],
                          parameters={"tile": 640, "tile_overlap": 0.2,
                                      "tile_merge": "greedy_nmm", "tile_full_image": True})
    labels, boxes = result.as_numpy("labels"), result.as_numpy("boxes")
    scores, names = result.as_numpy("scores"), result.as_numpy("names")
    longest = max(len(w[0]) for w in want)
    assert labels.shape == (2, longest) and boxes.shape == (2, longest, 4)
    for row, (want_labels, want_boxes, want_scores) in enumerate(want):
        count = len(want_labels)
        assert labels[row, :count].tolist() == want_labels
        np.testing.assert_allclose(boxes[row, :count], want_boxes, atol=0.01)
        np.testing.assert_allclose(scores[row, :count], want_scores, atol=1e-5)
        assert (labels[row, count:] == -1).all() and (scores[row, count:] == 0).all()
        assert all(n == b"" for n in names[row, count:])
    bad = module.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([BIG], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="tile"):
        triton.infer("dfine_n_shapes", [bad], parameters={"tile": "huge"})
    with pytest.raises(InferenceServerException, match="MAX_TILES"):
        triton.infer("dfine_n_shapes", [bad], parameters={"tile": 64})


def test_tiling_needs_image_files_not_tensors(running: Running) -> None:
    triton = thttp.InferenceServerClient(running.url.removeprefix("http://"))
    tensor = thttp.InferInput("images", [1, 3, 320, 320], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 320, 320), np.float32))
    with pytest.raises(InferenceServerException, match="tiling needs the image files"):
        triton.infer("dfine_n_shapes", [tensor], parameters={"tile": 640})


@pytest.fixture(scope="module")
def repository_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two models from one file: ``inherits`` takes the service's TILE (640), ``whole`` says
    none in its settings.json."""
    root = tmp_path_factory.mktemp("tiling-repo")
    for name in ("inherits", "whole"):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(DEFAULT_MODEL, root / name / "1" / "model.onnx")
    (root / "whole" / "settings.json").write_text('{"tile": "none", "tile_overlap": 0.1}')
    with run_server(root, "--model-repository", str(root), "--default-model", "inherits",
                    "--tile", "640", "--tile-full-image") as server:
        yield server


def test_service_and_model_defaults_apply_and_a_request_overrides_them(
        repository_server: Server) -> None:
    url = repository_server.url
    inherited = _detect(url, BIG, model="inherits").json()
    assert inherited["tiling"]["tile"] == 640
    assert "tiling" not in _detect(url, BIG, model="inherits", tile="none").json()
    assert "tiling" not in _detect(url, BIG, model="whole").json()
    asked = _detect(url, BIG, model="whole", tile=640).json()["tiling"]
    assert asked["tile"] == 640 and asked["overlap"] == 0.1  # the model's own overlap


def test_tiled_batches_of_several_images_fit_the_default_admission(
        repository_server: Server) -> None:
    """On the default settings (36 places on this CPU), three images of 17 engine images each:
    run one after another, each holding its tiles' places while it runs, all are answered."""
    url = repository_server.url
    response = httpx.post(f"{url}/detect/batch", params={"tile": 640}, timeout=240,
                          files=[("images", (f"{k}.jpg", BIG, "image/jpeg")) for k in range(3)])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["tiling"]["engine_images"] for r in results] == [17, 17, 17]
    assert results[0]["detections"] == results[2]["detections"]
    triton = thttp.InferenceServerClient(url.removeprefix("http://"))
    files = thttp.InferInput("image", [3], "BYTES")
    files.set_data_from_numpy(np.array([BIG] * 3, dtype=np.object_))
    answer = triton.infer("inherits", [files], parameters={"tile": 640})
    assert answer.as_numpy("labels").shape[0] == 3


def test_tile_parameters_without_tile_are_refused_where_nothing_tiles(
        repository_server: Server) -> None:
    response = _detect(repository_server.url, BIG, model="whole", tile_overlap=0.5)
    assert response.status_code == 422 and "need tile" in response.text


def test_bad_tiling_settings_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="tile"), run_server(tmp_path, "--tile", "huge",
                                                               ready_timeout_s=30):
        pass


def test_the_cost_bench_reports_tiles_and_runs_per_image(running: Running, tmp_path: Path
                                                         ) -> None:
    from app.bench.tiling import main as bench_tiling

    (tmp_path / "big.jpg").write_bytes(BIG)
    out = tmp_path / "rows.json"
    bench_tiling(["--url", running.url, "--images", str(tmp_path), "--variant", "tile=none",
                  "--variant", "tile=640", "--concurrency", "1", "--duration-s", "0.5",
                  "--rounds", "1", "--out", str(out)])
    import json

    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert rows["tile=none"]["tiles"] == 0 and rows["tile=none"]["engine_images"] == 1
    assert rows["tile=640"]["tiles"] > 1
    assert rows["tile=640"]["engine_images"] == rows["tile=640"]["tiles"] + 1
    assert all(r["images_per_s"] > 0 and r["requests"] >= 1 for r in rows.values())
