from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from models.data import load_coco, normalized_cxcywh
from models.synthetic import CLASSES, MAX_OBJECTS, render
from models.train import main as train_main


def test_render_is_reproducible_and_within_spec() -> None:
    for seed in range(20):
        image, shapes = render(seed)
        again, shapes_again = render(seed)
        assert np.array_equal(image, again) and shapes == shapes_again
        h, w = image.shape[:2]
        assert 240 <= h <= 1280 and 240 <= w <= 1280 and h != w
        assert 1 <= len(shapes) <= MAX_OBJECTS
        for shape in shapes:
            x, y, bw, bh = shape.bbox_xywh
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
            assert max(bw, bh) >= 0.05 * min(h, w)  # at least ~8% of the short side, rotated
            assert 0 <= shape.class_id < len(CLASSES)


def test_coco_split_has_boxes_matching_images(tiny_shapes: Path) -> None:
    dataset = load_coco(tiny_shapes)
    assert dataset.labels == list(CLASSES)
    assert dataset.category_ids == [1, 2, 3]
    assert len(dataset.images) == 6
    for image in dataset.images:
        assert image.path.exists() and image.class_ids
        boxes = normalized_cxcywh(image)
        assert ((boxes >= 0) & (boxes <= 1)).all()


def test_training_smoke_writes_a_resumable_checkpoint(tiny_shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", str(tiny_shapes), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--threads", "2", "--log-every", "1", "--device", "cpu"]
    train_main(args)
    assert (out / "last.pt").exists() and (out / "final" / "model.safetensors").exists()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    train_main([*args[:5], "3", *args[6:], "--resume"])
    done = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["done"]
    assert done["step"] == 3
