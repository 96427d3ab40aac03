"""The service by default against the official D-FINE pipeline (torch_inf.py's PIL
preprocessing, the ONNX model run directly): with clip=false it gives the same 300 detections,
to the rounding it documents. With clipping and dedupe it differs only as documented."""

from __future__ import annotations

import io

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tests.helpers import DEFAULT_MODEL, Server, encode, render_scene

SIZE = 320  # the shipped model's input


def official_pipeline(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    tensor = torch.from_numpy(np.array(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
    pixels = tensor.permute(2, 0, 1).to(torch.float32).div(255)[None].numpy()
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    labels, boxes, scores = session.run(None, {"images": pixels,
                                               "orig_target_sizes": np.asarray([[w, h]])})
    return labels[0], boxes[0], scores[0]


def photo(seed: int, size: tuple[int, int]) -> bytes:
    """A rendered scene stretched to an odd photo-like size, as JPEG."""
    image = Image.fromarray(np.ascontiguousarray(render_scene(seed)[0][..., ::-1])).resize(size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


@pytest.mark.parametrize(("seed", "size"), [(50, (2016, 1512)), (51, (301, 517)),
                                            (52, (640, 480))])
def test_unclipped_answer_is_the_official_pipelines(server: Server, seed: int,
                                                    size: tuple[int, int]) -> None:
    data = photo(seed, size)
    labels, boxes, scores = official_pipeline(data)
    answer = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                        params={"score_threshold": 0, "max_detections": 300, "clip": "false"},
                        headers={"Content-Type": "image/jpeg"}).json()
    assert answer["image"] == {"width": size[0], "height": size[1]}
    found = answer["detections"]
    assert len(found) == 300
    assert [d["class_id"] for d in found[:50]] == labels[:50].tolist()
    np.testing.assert_allclose([d["score"] for d in found], scores, atol=1e-5)
    got = np.asarray([[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in found])
    np.testing.assert_allclose(got[:50], boxes[:50], atol=0.011)
    assert (boxes < 0).any() or (boxes[:, 2] > size[0]).any()  # the official does not clip


def test_clipping_is_the_only_difference_by_default(server: Server) -> None:
    data = encode(render_scene(53)[0])
    clipped = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                         params={"score_threshold": 0, "max_detections": 300},
                         headers={"Content-Type": "image/jpeg"}).json()
    raw = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                     params={"score_threshold": 0, "max_detections": 300, "clip": "false"},
                     headers={"Content-Type": "image/jpeg"}).json()
    width, height = clipped["image"]["width"], clipped["image"]["height"]
    for a, b in zip(clipped["detections"], raw["detections"], strict=True):
        assert a["score"] == b["score"] and a["class_id"] == b["class_id"]
        assert a["box"]["x1"] == min(max(b["box"]["x1"], 0), width)
        assert a["box"]["y2"] == min(max(b["box"]["y2"], 0), height)
    merged = httpx.post(f"{server.url}/detect", content=data, timeout=30,
                        params={"score_threshold": 0.3, "dedupe_iou": 0.7},
                        headers={"Content-Type": "image/jpeg"}).json()["detections"]
    plain = [d for d in clipped["detections"] if d["score"] >= 0.3][:100]
    assert len(merged) <= len(plain) and {d["label"] for d in merged} <= {
        d["label"] for d in plain}
