"""models/synthetic.py: the small-object scenes (issue 28), and the default ones unchanged."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.synthetic import CLASSES, Shape, SmallScene, main, render, render_small

# One seed of each background kind (field, stripes, flat, gradient, blobs, noise), all small.
DEFAULT_SEEDS = (47, 11, 34, 27, 49, 48)
# Digests of render(seed) for DEFAULT_SEEDS, taken before the small scenes were added. The
# shapes' digest pins the random draws' order and the geometry; the image's also pins OpenCV's
# anti-aliased drawing, so an OpenCV upgrade alone can change it (the data set then changes too).
SHAPES_SHA256 = "0242194f79b4559477caca77d400446efa80310714b4dc7d96ee78568b562458"
IMAGES_SHA256 = "4150d547a38df33a6ecd4e7029b1e8e057212e3fbb87312c3a216d468604eaa2"


def test_the_default_scenes_are_unchanged_for_their_seeds() -> None:
    images, shapes = hashlib.sha256(), hashlib.sha256()
    for seed in DEFAULT_SEEDS:
        image, found = render(seed)
        images.update(image.tobytes())
        shapes.update(repr([(s.class_id, s.bbox_xywh) for s in found]).encode())
    assert shapes.hexdigest() == SHAPES_SHA256
    assert images.hexdigest() == IMAGES_SHA256


def _check_scene(image: np.ndarray, shapes: list[Shape], scene: SmallScene) -> None:
    assert image.shape == (scene.height, scene.width, 3) and image.dtype == np.uint8
    for shape in shapes:
        x, y, w, h = shape.bbox_xywh
        assert x >= 0 and y >= 0 and x + w <= scene.width and y + h <= scene.height
        # A size is a diameter or a longer side: the box's longer side is between ~0.34 of it
        # (a thin triangle: its points within 1 radian of the circle, its longest edge
        # 2 sin(0.5) = 0.48 of the diameter, turned 45 degrees) and sqrt(2) times it (a square
        # at 45 degrees).
        assert 0.33 * scene.min_object - 1 <= max(w, h) <= math.sqrt(2) * scene.max_object + 2
        assert 0 <= shape.class_id < len(CLASSES)


def test_small_scenes_have_many_small_boxes_inside_the_image() -> None:
    scene = SmallScene()
    sizes = []
    for seed in range(3):
        image, shapes = render_small(seed, scene)
        assert scene.min_objects <= len(shapes) <= scene.max_objects
        _check_scene(image, shapes, scene)
        sizes += [max(s.bbox_xywh[2:]) for s in shapes]
        assert {s.class_id for s in shapes} == set(range(len(CLASSES)))
    # Mostly COCO "small" (under 32 x 32): what APs measures.
    assert np.median(sizes) < 32 and min(sizes) < 16 and max(sizes) > 36


def test_small_scenes_are_deterministic_per_seed() -> None:
    scene = SmallScene(640, 480, 16, 48, 10, 30)
    image, shapes = render_small(7, scene)
    again, shapes_again = render_small(7, scene)
    assert np.array_equal(image, again) and shapes == shapes_again
    other, other_shapes = render_small(8, scene)
    assert not np.array_equal(image, other) and shapes != other_shapes
    _check_scene(image, shapes, scene)


def test_a_crowded_scene_places_fewer_shapes_than_asked() -> None:
    # 200 shapes of 40 px cannot share 256 x 256 pixels while each stays 60 % visible.
    scene = SmallScene(256, 256, 40, 40, 200, 200)
    image, shapes = render_small(0, scene)
    assert 10 <= len(shapes) < 200
    _check_scene(image, shapes, scene)


@pytest.mark.parametrize("kwargs", [
    {"min_object": 3}, {"min_object": 50, "max_object": 40}, {"width": 40},
    {"min_objects": 0}, {"min_objects": 9, "max_objects": 8},
])
def test_small_scene_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SmallScene(**kwargs)


def test_cli_writes_a_small_coco_split(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--small", "--image-size", "320x256", "--object-size", "16",
          "24", "--objects", "3", "6", "--val", "2", "--workers", "1"])
    assert not (tmp_path / "train").exists()  # --small: no train split unless asked
    coco = json.loads((tmp_path / "val" / "annotations.json").read_text())
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(320, 256)] * 2
    assert all((tmp_path / "val" / i["file_name"]).is_file() for i in coco["images"])
    assert 2 * 3 <= len(coco["annotations"]) <= 2 * 6
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert x + w <= 320 and y + h <= 256 and max(w, h) <= math.sqrt(2) * 24 + 2
