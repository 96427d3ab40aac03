from __future__ import annotations

import numpy as np
import pytest

from app.engine.layouts import raw_head_to_official
from app.imaging import Letterbox
from app.postprocess import select

NAMES = ["circle", "rectangle", "triangle"]


def official_output() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray([1, 0, 2, 1, 0], np.int64)
    boxes = np.asarray([[10, 10, 50, 50], [-5, -5, 30, 30], [90, 40, 130, 90],
                        [10, 10, 50, 50], [0, 0, 1, 1]], np.float32)
    scores = np.asarray([0.9, 0.8, 0.7, 0.4, 0.1], np.float32)
    return labels, boxes, scores


def test_threshold_and_ordering() -> None:
    found = select(*official_output(), 100, 80, NAMES, 0.5, 100)
    assert [d.score for d in found] == pytest.approx([0.9, 0.8, 0.7])
    assert [d.label for d in found] == ["rectangle", "circle", "triangle"]


def test_boxes_are_clipped_to_the_image() -> None:
    found = select(*official_output(), 100, 80, NAMES, 0.5, 100)
    assert found[1].box == (0.0, 0.0, 30.0, 30.0)
    assert found[2].box == (90.0, 40.0, 100.0, 80.0)


def test_class_filter_and_max_detections() -> None:
    found = select(*official_output(), 100, 80, NAMES, 0.0, 100, class_ids=frozenset({1}))
    assert [d.class_id for d in found] == [1, 1]  # the same box twice with two labels is kept
    assert len(select(*official_output(), 100, 80, NAMES, 0.0, 2)) == 2


def test_unsorted_input_comes_out_sorted_and_unnamed_classes_use_their_index() -> None:
    labels, boxes, scores = official_output()
    order = np.asarray([4, 2, 0, 3, 1])
    found = select(labels[order], boxes[order], scores[order], 100, 80, None, 0.5, 100)
    assert [d.label for d in found] == ["1", "0", "2"]


def test_letterboxed_boxes_map_back_to_the_original() -> None:
    # A 200x100 image letterboxed into 320x320: scale 1.6, 80 px bars above and below.
    labels = np.asarray([0], np.int64)
    boxes = np.asarray([[16.0, 96.0, 176.0, 176.0]], np.float32)
    found = select(labels, boxes, np.asarray([0.9], np.float32), 200, 100, NAMES, 0.5, 10,
                   letterbox=Letterbox(1.6, 0.0, 80.0))
    assert found[0].box == pytest.approx((10.0, 10.0, 110.0, 60.0))


def test_raw_head_postprocess_matches_the_official_graph_semantics() -> None:
    logits = np.full((1, 3, 2), -10.0, np.float32)
    logits[0, 1, 0] = 2.0  # query 1, class 0: the best
    logits[0, 2, 1] = 1.0  # query 2, class 1
    logits[0, 1, 1] = 0.0  # query 1 again, class 1
    boxes = np.asarray([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]],
                       np.float32)
    labels, xyxy, scores = raw_head_to_official(logits, boxes, np.asarray([[200, 100]]), 3)
    assert labels.tolist() == [[0, 1, 1]]
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-np.asarray([2.0, 1.0, 0.0]))))
    assert xyxy[0, 0] == pytest.approx([0, 0, 100, 100])
    assert xyxy[0, 1] == pytest.approx([0, 0, 200, 100])
    assert xyxy[0, 2] == pytest.approx(xyxy[0, 0])


def test_clip_false_keeps_the_models_boxes_and_values_are_rounded() -> None:
    labels, boxes, scores = official_output()
    boxes[0] = [10.123456, 10.987654, 50.004999, 50.5]
    scores[0] = 0.912345678
    found = select(labels, boxes, scores, 100, 80, NAMES, 0.5, 100, clip=False)
    assert found[1].box == (-5.0, -5.0, 30.0, 30.0)  # the official pipeline does not clip
    assert found[2].box == (90.0, 40.0, 130.0, 90.0)
    assert found[0].box == (10.12, 10.99, 50.0, 50.5)  # 0.01 pixel
    assert found[0].score == 0.91235  # 5 decimals


def test_dedupe_drops_a_weaker_same_class_box_that_overlaps_and_nothing_else() -> None:
    labels = np.asarray([0, 0, 1, 0, 0], np.int64)
    boxes = np.asarray([[10, 10, 50, 50], [11, 11, 51, 51],  # the same object twice
                        [10, 10, 50, 50],  # the same box, another class: kept
                        [60, 60, 90, 90],  # elsewhere: kept
                        [12, 10, 50, 52]], np.float32)  # a third copy
    scores = np.asarray([0.9, 0.8, 0.7, 0.6, 0.55], np.float32)
    off = select(labels, boxes, scores, 100, 100, NAMES, 0.5, 100)
    assert len(off) == 5  # the model's answer, by default
    on = select(labels, boxes, scores, 100, 100, NAMES, 0.5, 100, dedupe_iou=0.7)
    assert [(d.class_id, d.score) for d in on] == [(0, 0.9), (1, 0.7), (0, 0.6)]
    capped = select(labels, boxes, scores, 100, 100, NAMES, 0.5, 2, dedupe_iou=0.7)
    assert [d.score for d in capped] == [0.9, 0.7]  # max_detections counts what is kept
