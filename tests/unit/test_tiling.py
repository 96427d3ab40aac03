"""Tiled inference's pure core (app/tiling.py): the grid, tile=auto, shifting and merging."""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest

from app.tiling import (
    AUTO_MAX_TILES,
    Tile,
    Tiling,
    auto_tile,
    merge,
    parse_tile,
    shift,
    tile_count,
    tile_grid,
)

# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def sahi_slice_bboxes(width: int, height: int, tile: int, overlap: float) -> list[Tile]:
    """SAHI's get_slice_bboxes (sahi/slicing.py), its loop as it is, for comparison."""
    out: list[Tile] = []
    y_max = y_min = 0
    y_overlap = x_overlap = int(overlap * tile)
    while y_max < height:
        x_min = x_max = 0
        y_max = y_min + tile
        while x_max < width:
            x_max = x_min + tile
            if y_max > height or x_max > width:
                x_max = min(width, x_max)
                y_max = min(height, y_max)
                x_min = max(0, x_max - tile)
                y_min = max(0, y_max - tile)
            out.append(Tile(x_min, y_min, x_max - x_min, y_max - y_min))
            x_min = x_max - x_overlap
        y_min = y_max - y_overlap
    return out


def assert_grid(width: int, height: int, tile: int, overlap: float) -> list[Tile]:
    """Every property the grid promises, checked on the windows themselves."""
    grid = tile_grid(width, height, tile, overlap)
    assert grid == tile_grid(width, height, tile, overlap)  # deterministic
    assert len(grid) == len(set(grid)) == tile_count(width, height, tile, overlap)
    size = (min(tile, width), min(tile, height))
    covered = np.zeros((height, width), np.int32)
    for window in grid:
        assert (window.width, window.height) == size  # full size, the edges moved back
        assert window.x >= 0 and window.x + window.width <= width
        assert window.y >= 0 and window.y + window.height <= height
        covered[window.y:window.y + window.height, window.x:window.x + window.width] += 1
    assert covered.min() >= 1, "a pixel no window covers"
    assert grid == sorted(grid, key=lambda w: (w.y, w.x)), "not row-major"
    xs = sorted({w.x for w in grid})
    ys = sorted({w.y for w in grid})
    assert len(grid) == len(xs) * len(ys)  # a full grid: every row has every column
    assert xs[0] == 0 and ys[0] == 0
    assert xs[-1] + size[0] == width and ys[-1] + size[1] == height  # edges included
    for starts, extent in ((xs, size[0]), (ys, size[1])):
        for before, after in itertools.pairwise(starts):
            assert after > before
            # at least the overlap asked, or tile - 1 pixels (stride 1) where it is more
            wanted = min(overlap * tile - 1e-9, tile - 1)
            assert before + extent - after >= wanted, "overlap below the asked"
    return grid


@pytest.mark.parametrize(("width", "height", "tile", "overlap"), [
    (1001, 777, 320, 0.2), (1920, 1080, 640, 0.2), (4000, 3000, 1280, 0.2), (641, 640, 640, 0.2),
    (333, 1000, 100, 0.33), (1000, 1000, 100, 0.0), (999, 1, 64, 0.5), (5000, 200, 640, 0.25),
    (50, 50, 7, 0.9), (100, 10, 3, 0.999),
])
def test_the_grid_covers_the_image_with_the_overlap_asked(
        width: int, height: int, tile: int, overlap: float) -> None:
    assert_grid(width, height, tile, overlap)


def test_odd_size_example_windows() -> None:
    grid = assert_grid(1001, 777, 320, 0.2)
    # stride 256: columns 0, 256, 512 and the last moved back to end at 1001; rows likewise
    assert sorted({w.x for w in grid}) == [0, 256, 512, 681]
    assert sorted({w.y for w in grid}) == [0, 256, 457]
    assert grid[:5] == [Tile(0, 0, 320, 320), Tile(256, 0, 320, 320), Tile(512, 0, 320, 320),
                        Tile(681, 0, 320, 320), Tile(0, 256, 320, 320)]


@pytest.mark.parametrize(("width", "height"), [(100, 80), (319, 320), (1, 1)])
def test_an_image_smaller_than_a_tile_is_one_window_the_image(width: int, height: int) -> None:
    assert tile_grid(width, height, 320, 0.2) == [Tile(0, 0, width, height)]


def test_a_tile_the_size_of_the_image_is_one_window() -> None:
    assert tile_grid(640, 480, 640, 0.2) == [Tile(0, 0, 640, 480)]
    assert tile_grid(640, 640, 640, 0.0) == [Tile(0, 0, 640, 640)]


def test_an_axis_smaller_than_the_tile_is_clamped_the_other_is_tiled() -> None:
    grid = assert_grid(1000, 100, 320, 0.2)
    assert {(w.width, w.height) for w in grid} == {(320, 100)}
    assert [w.x for w in grid] == [0, 256, 512, 680]


def test_no_overlap_tiles_edge_to_edge_and_moves_the_last_back() -> None:
    assert [w.x for w in tile_grid(960, 100, 320, 0.0)] == [0, 320, 640]
    # supervision would clip the last window to 1000 - 960 = 40 pixels; here it is a full tile
    assert [w.x for w in tile_grid(1000, 100, 320, 0.0)] == [0, 320, 640, 680]


def test_the_overlap_is_rounded_up_where_sahi_rounds_it_down() -> None:
    # 0.2 of 333 is 66.6 pixels: SAHI's int() makes it 66, which is less than asked
    xs = [w.x for w in tile_grid(1000, 10, 333, 0.2)]
    assert xs[0] + 333 - xs[1] == 67
    assert [w.x for w in sahi_slice_bboxes(1000, 10, 333, 0.2)][:2] == [0, 267]


@pytest.mark.parametrize(("width", "height", "tile", "overlap"), [
    (1001, 777, 320, 0.2), (1920, 1080, 640, 0.25), (4000, 3000, 1024, 0.5), (640, 480, 640, 0.2),
    (100, 80, 320, 0.2), (1000, 1000, 100, 0.0), (5000, 200, 640, 0.25), (2048, 2048, 640, 0.2),
])
def test_the_grid_is_sahis_where_the_overlap_is_a_whole_number_of_pixels(
        width: int, height: int, tile: int, overlap: float) -> None:
    expected = sahi_slice_bboxes(width, height, tile, overlap)
    assert tile_grid(width, height, tile, overlap) == expected


def test_an_overlap_above_tile_less_one_pixel_gives_stride_one() -> None:
    assert [w.x for w in tile_grid(10, 1, 7, 0.9)] == [0, 1, 2, 3]


def test_tile_count_matches_the_grid_and_needs_no_grid() -> None:
    for width, height, tile, overlap in [(1001, 777, 320, 0.2), (8000, 6000, 640, 0.0),
                                         (77, 5000, 64, 0.7)]:
        assert tile_count(width, height, tile, overlap) == len(tile_grid(width, height, tile,
                                                                         overlap))
    # an overlap near 1 asks for millions of windows: counted, never built
    assert tile_count(8000, 6000, 640, 0.9999) == 7361 * 5361


@pytest.mark.parametrize(("width", "height", "tile", "overlap"), [
    (0, 10, 10, 0.2), (10, -1, 10, 0.2), (10, 10, 0, 0.2), (10, 10, 10, 1.0), (10, 10, 10, -0.1),
    (10, 10, 10, float("nan")),
])
def test_grid_arguments_out_of_range_are_refused(
        width: int, height: int, tile: int, overlap: float) -> None:
    with pytest.raises(ValueError):
        tile_grid(width, height, tile, overlap)
    with pytest.raises(ValueError):
        tile_count(width, height, tile, overlap)


# ---------------------------------------------------------------------------------------------
# tile=auto
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [320, 640])
@pytest.mark.parametrize(("width", "height"), [(640, 480), (480, 640), (320, 320), (100, 50)])
def test_auto_does_not_tile_images_near_the_input_size(model: int, width: int,
                                                       height: int) -> None:
    assert auto_tile(width, height, (model, model)) is None


def test_auto_tiles_from_just_over_twice_the_input() -> None:
    assert auto_tile(1280, 960, (640, 640)) is None
    assert auto_tile(1281, 960, (640, 640)) == 640
    assert auto_tile(641, 300, (320, 320)) == 320


@pytest.mark.parametrize(("width", "height", "model", "tile"), [
    (1920, 1080, 320, 480), (4000, 3000, 320, 1280), (8000, 6000, 320, 2400),
    (1920, 1080, 640, 640), (4000, 3000, 640, 1280), (8000, 6000, 640, 2560),
    (2048, 2048, 320, 640),
])
def test_auto_examples(width: int, height: int, model: int, tile: int) -> None:
    assert auto_tile(width, height, (model, model)) == tile


def test_auto_tiles_are_at_least_the_input_gain_resolution_and_stay_few() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = (int(v) for v in rng.integers(100, 12000, 2))
        model = int(rng.choice([320, 640]))
        tile = auto_tile(width, height, (model, model))
        if max(width, height) <= 2 * model:
            assert tile is None
            continue
        assert tile is not None
        assert model <= tile < max(width, height)
        assert tile_count(width, height, tile, 0.2) <= AUTO_MAX_TILES
        if tile > model:  # the next smaller step would have been too many tiles
            assert tile_count(width, height, tile - model // 2, 0.2) > AUTO_MAX_TILES


def test_auto_uses_the_inputs_long_side_and_the_overlap_given() -> None:
    assert auto_tile(1920, 1080, (640, 384)) == auto_tile(1920, 1080, (640, 640))
    assert auto_tile(4000, 3000, (640, 640), overlap=0.5) == 1600
    assert tile_count(4000, 3000, 1600, 0.5) == 12 < tile_count(4000, 3000, 1280, 0.5)
    with pytest.raises(ValueError):
        auto_tile(4000, 3000, (0, 640))


# ---------------------------------------------------------------------------------------------
# shift
# ---------------------------------------------------------------------------------------------


def test_shift_moves_tile_boxes_to_the_original_image() -> None:
    local = np.asarray([[0, 0, 10, 20], [5.5, 6, 7, 8]], np.float32)
    moved = shift(local, Tile(256, 512, 320, 320))
    assert moved.dtype == np.float32
    np.testing.assert_array_equal(moved, [[256, 512, 266, 532], [261.5, 518, 263, 520]])
    np.testing.assert_array_equal(local[0], [0, 0, 10, 20])  # not in place
    assert shift(np.asarray([[1, 2, 3, 4]]), Tile(1, 1, 5, 5)).dtype == np.float64
    assert shift(np.zeros((0, 4)), Tile(1, 1, 5, 5)).shape == (0, 4)
    with pytest.raises(ValueError):
        shift(np.zeros((3, 5)), Tile(0, 0, 1, 1))


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


def as_arrays(detections: list[tuple[tuple[float, float, float, float], float, int]],
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray([d[0] for d in detections], np.float32).reshape(-1, 4)
    scores = np.asarray([d[1] for d in detections], np.float32)
    labels = np.asarray([d[2] for d in detections], np.int64)
    return boxes, scores, labels


def split_object() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An object at x 220..380 in a 576x320 image tiled at 320 with 0.2 overlap: the windows
    are x 0..320 and 256..576, and neither holds it whole. Each tile's model finds the piece it
    sees, in the tile's pixels; shifted to the image's."""
    left, right = tile_grid(576, 320, 320, 0.2)
    assert (left.x, right.x) == (0, 256)
    piece_left = shift(np.asarray([[220, 100, 320, 160]], np.float32), left)  # cut at 320
    piece_right = shift(np.asarray([[0, 101, 124, 159]], np.float32), right)  # cut at 256
    boxes = np.concatenate([piece_left, piece_right])
    return boxes, np.asarray([0.8, 0.9], np.float32), np.asarray([2, 2], np.int64)


def test_an_object_split_across_two_tiles_comes_back_once_at_full_size() -> None:
    boxes, scores, labels = merge(*split_object(), "greedy_nmm", 0.5, "ios")
    np.testing.assert_array_equal(boxes, [[220, 100, 380, 160]])
    assert scores.tolist() == pytest.approx([0.9])  # the best piece's score
    assert labels.tolist() == [2]


def test_nms_keeps_the_best_piece_and_greedy_merging_the_whole() -> None:
    pieces = split_object()
    boxes, scores, _ = merge(*pieces, "nms", 0.5, "ios")
    np.testing.assert_array_equal(boxes, [[256, 101, 380, 159]])  # the right piece, cut
    assert scores.tolist() == pytest.approx([0.9])
    boxes, _, _ = merge(*pieces, "none", 0.5, "ios")
    assert len(boxes) == 2
    # by IoU the pieces overlap by 64 of 160 pixels' width: 0.36, no match at 0.5
    assert len(merge(*pieces, "greedy_nmm", 0.5, "iou")[0]) == 2
    assert len(merge(*pieces, "nms", 0.5, "iou")[0]) == 2


@pytest.mark.parametrize("method", ["nms", "greedy_nmm"])
@pytest.mark.parametrize("metric", ["iou", "ios"])
def test_two_touching_objects_of_one_class_stay_two(method: str, metric: str) -> None:
    detections = as_arrays([((100, 100, 150, 150), 0.9, 1), ((150, 100, 200, 150), 0.8, 1),
                            ((100, 147, 150, 197), 0.7, 1)])  # 3 rows of 50 shared: ios 0.06
    boxes, scores, _ = merge(*detections, method, 0.5, metric)  # type: ignore[arg-type]
    assert len(boxes) == 3
    np.testing.assert_array_equal(boxes, detections[0])
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.7])


@pytest.mark.parametrize("method", ["nms", "greedy_nmm"])
def test_merging_is_class_aware_unless_asked_otherwise(method: str) -> None:
    detections = as_arrays([((10, 10, 50, 50), 0.6, 0), ((12, 10, 52, 50), 0.9, 1)])
    boxes, scores, labels = merge(*detections, method, 0.5, "iou")  # type: ignore[arg-type]
    assert labels.tolist() == [1, 0] and scores.tolist() == pytest.approx([0.9, 0.6])
    boxes, scores, labels = merge(*detections, method, 0.5, "iou",  # type: ignore[arg-type]
                                  class_aware=False)
    assert labels.tolist() == [1] and scores.tolist() == pytest.approx([0.9])
    expected = [10, 10, 52, 50] if method == "greedy_nmm" else [12, 10, 52, 50]
    np.testing.assert_array_equal(boxes, [expected])


def test_ios_merges_a_box_inside_another_iou_does_not() -> None:
    detections = as_arrays([((0, 0, 100, 100), 0.9, 0), ((10, 10, 30, 30), 0.8, 0)])
    assert len(merge(*detections, "nms", 0.5, "ios")[0]) == 1
    assert len(merge(*detections, "nms", 0.5, "iou")[0]) == 2


def test_greedy_merging_rechecks_against_the_growing_box_as_sahi_does() -> None:
    # B and C each overlap A by IoU 70/130 = 0.54. B (the better) widens A to 0..13; C's IoU
    # with that is 70/160 = 0.44, so C is dropped, not merged, and the box does not reach -3.
    detections = as_arrays([((0, 0, 10, 10), 0.9, 0), ((3, 0, 13, 10), 0.8, 0),
                            ((-3, 0, 7, 10), 0.7, 0)])
    boxes, scores, _ = merge(*detections, "greedy_nmm", 0.5, "iou")
    np.testing.assert_array_equal(boxes, [[0, 0, 13, 10]])
    assert scores.tolist() == pytest.approx([0.9])


def test_a_match_exactly_at_the_threshold_counts() -> None:
    # ios exactly 0.5 (50 of the smaller's 100 pixels' area): merged, where SAHI's final
    # re-check (">") would drop the piece without widening the box
    detections = as_arrays([((0, 0, 10, 10), 0.9, 0), ((5, 0, 15, 10), 0.8, 0)])
    boxes, _, _ = merge(*detections, "greedy_nmm", 0.5, "ios")
    np.testing.assert_array_equal(boxes, [[0, 0, 15, 10]])
    assert len(merge(*detections, "nms", 0.5, "ios")[0]) == 1
    assert len(merge(*detections, "nms", 0.51, "ios")[0]) == 2


def test_results_come_sorted_by_score_with_sahis_tie_break() -> None:
    detections = as_arrays([((300, 0, 310, 10), 0.5, 0), ((0, 0, 10, 10), 0.7, 1),
                            ((100, 0, 110, 10), 0.9, 0), ((50, 0, 60, 10), 0.7, 0)])
    for method in ("nms", "greedy_nmm", "none"):
        boxes, scores, labels = merge(*detections, method, 0.5, "iou")
        assert scores.tolist() == pytest.approx([0.9, 0.7, 0.7, 0.5])
        assert boxes[:, 0].tolist() == [100, 0, 50, 300]  # equal scores: by x1
        assert labels.tolist() == [0, 1, 0, 0]


def test_empty_and_single_inputs() -> None:
    for method in ("nms", "greedy_nmm", "none"):
        boxes, scores, labels = merge(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                      np.zeros(0, np.int64), method, 0.5, "ios")
        assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)
        boxes, _, _ = merge(*as_arrays([((1, 2, 3, 4), 0.5, 0)]), method, 0.5, "ios")
        np.testing.assert_array_equal(boxes, [[1, 2, 3, 4]])


def test_dtypes_are_kept_and_inputs_untouched() -> None:
    boxes, scores, labels = split_object()
    before = boxes.copy()
    out_boxes, out_scores, out_labels = merge(boxes, scores, labels, "greedy_nmm", 0.5, "ios")
    assert [str(a.dtype) for a in (out_boxes, out_scores, out_labels)] == [
        "float32", "float32", "int64"]
    np.testing.assert_array_equal(boxes, before)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"method": "soft"}, "method"), ({"metric": "giou"}, "metric"),
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
    ({"boxes": np.zeros((2, 3))}, "boxes"),
    ({"scores": np.zeros(3)}, "scores"), ({"labels": np.zeros(2)}, "integers"),
    ({"boxes": np.asarray([[0, 0, np.nan, 1], [0, 0, 1, 1]])}, "finite"),
])
def test_merge_arguments_out_of_range_are_refused(kwargs: dict[str, object], error: str) -> None:
    arguments: dict[str, object] = {
        "boxes": np.zeros((2, 4)), "scores": np.zeros(2), "labels": np.zeros(2, np.int64),
        "method": "nms", "threshold": 0.5, "metric": "iou"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=error):
        merge(**arguments)  # type: ignore[arg-type]


# A literal port of SAHI's numpy backend (greedy_nmm_from_matrix, nms_from_matrix) and of its
# merge step (_apply_merge: has_match against the growing box, the union, the max score), with
# ">=" in the re-check as documented: merge() must give the same answers on crowded scenes.


def reference(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, method: str,
              threshold: float, metric: str, class_aware: bool,
              ) -> list[tuple[tuple[float, ...], float, int]]:
    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
                 * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        denominator = area_a + area_b - inter if metric == "iou" else min(area_a, area_b)
        return inter / denominator if denominator > 0 else 0.0

    b = boxes.astype(np.float64)
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], -scores))
    suppressed = np.zeros(len(b), bool)
    out = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        later = [j for j in order[position + 1:] if not suppressed[j]
                 and (not class_aware or labels[j] == labels[i])
                 and overlap(b[i], b[j]) >= threshold]
        suppressed[later] = True
        kept = b[i].copy()
        if method == "greedy_nmm":
            for j in later:
                if overlap(kept, b[j]) >= threshold:
                    kept = np.concatenate([np.minimum(kept[:2], b[j][:2]),
                                           np.maximum(kept[2:], b[j][2:])])
        out.append((tuple(kept.tolist()), float(scores[i]), int(labels[i])))
    return out


def crowded_scene(rng: np.random.Generator, objects: int, copies: int, classes: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects seen several times each (tiles, pieces, the model's near-duplicates), jittered;
    whole-pixel coordinates so that exact ties and exact thresholds happen too."""
    centre = rng.integers(0, 600, (objects, 2))
    size = rng.integers(4, 80, (objects, 2))
    boxes = np.concatenate([centre - size // 2, centre + size // 2], axis=1)
    boxes = np.repeat(boxes, copies, axis=0) + rng.integers(-6, 7, (objects * copies, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = rng.integers(1, 20, objects * copies) / 20  # ties on purpose
    labels = rng.integers(0, classes, objects * copies)
    return boxes.astype(np.float32), scores.astype(np.float32), labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["nms", "greedy_nmm"])
@pytest.mark.parametrize("metric", ["iou", "ios"])
@pytest.mark.parametrize("class_aware", [True, False])
def test_merge_matches_a_literal_port_of_sahi(seed: int, method: str, metric: str,
                                              class_aware: bool) -> None:
    rng = np.random.default_rng(seed)
    boxes, scores, labels = crowded_scene(rng, 40, 4, 3)
    threshold = [0.3, 0.5, 0.7][seed % 3]
    got = merge(boxes, scores, labels, method, threshold, metric,  # type: ignore[arg-type]
                class_aware=class_aware)
    expected = reference(boxes, scores, labels, method, threshold, metric, class_aware)
    assert len(got[0]) == len(expected)
    assert len(expected) < len(boxes)  # something was merged
    np.testing.assert_array_equal(got[0], np.asarray([e[0] for e in expected], np.float32))
    assert got[1].tolist() == pytest.approx([e[1] for e in expected])
    assert got[2].tolist() == [e[2] for e in expected]


def test_merging_thousands_of_boxes_is_quick() -> None:
    rng = np.random.default_rng(1)
    boxes, scores, labels = crowded_scene(rng, 1250, 4, 5)
    boxes *= 6  # a 3600-pixel image
    started = time.perf_counter()
    for method in ("nms", "greedy_nmm"):
        merged = merge(boxes, scores, labels, method, 0.5, "ios")
        assert 0 < len(merged[0]) < len(boxes)
    # a pure-Python pairwise loop over 5,000 boxes takes tens of seconds
    assert time.perf_counter() - started < 3.0


# --- a request's tiling options ------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("auto", "auto"), (" AUTO ", "auto"), ("640", 640), ("32", 32), ("none", None),
    ("off", None), ("0", None), ("", None)])
def test_parse_tile_reads_auto_sizes_and_none(text: str, value: object) -> None:
    assert parse_tile(text) == value


@pytest.mark.parametrize("text", ["31", "65537", "-640", "6.5", "big", "٣٢٠", "1e3", "1000000"])
def test_parse_tile_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="tile must be"):
        parse_tile(text)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"tile": 16}, "tile must be"), ({"overlap": 0.95}, "tile_overlap"),
    ({"overlap": float("nan")}, "tile_overlap"), ({"merge": "mean"}, "tile_merge must"),
    ({"merge_metric": "giou"}, "tile_merge_metric"), ({"merge_threshold": 0.0}, "threshold"),
    ({"merge_threshold": 1.5}, "threshold")])
def test_tiling_options_out_of_range_are_refused(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Tiling(**kwargs)


def test_the_tile_size_of_an_image() -> None:
    assert Tiling(tile="auto").tile_size(600, 450, (320, 320), 16) is None
    assert Tiling(tile="auto").tile_size(2048, 2048, (320, 320), 16) == 640
    assert Tiling(tile="auto").tile_size(2048, 2048, (320, 320), 4) == 1280  # MAX_TILES 4
    assert Tiling(tile=640).tile_size(2048, 500, (320, 320), 16) == 640
    assert Tiling(tile=640).tile_size(640, 480, (320, 320), 16) is None  # one window: whole


def test_a_box_whole_within_its_tile_does_not_grow_into_a_weaker_larger_one() -> None:
    """SAHI's greedy merging grows a confident box to a weaker false positive that contains
    it; with ``cut`` only a box that reaches an inner tile border grows."""
    boxes = [[100, 100, 150, 150], [90, 90, 400, 300]]  # confident; weak and spanning more
    scores, labels = [0.98, 0.53], [0, 0]
    sahi, _, _ = merge(boxes, scores, labels, "greedy_nmm", 0.5, "ios")
    assert sahi.tolist() == [[90, 90, 400, 300]]
    kept, kept_scores, _ = merge(boxes, scores, labels, "greedy_nmm", 0.5, "ios",
                                 cut=[False, False])
    assert kept.tolist() == [[100, 100, 150, 150]] and kept_scores.tolist() == [0.98]
    # A piece cut by a border grows to the whole object that another window saw.
    piece = [[300, 100, 320, 150], [260, 100, 340, 150]]
    grown, _, _ = merge(piece, [0.9, 0.8], [0, 0], "greedy_nmm", 0.5, "ios", cut=[True, False])
    assert grown.tolist() == [[260, 100, 340, 150]]
    with pytest.raises(ValueError, match="cut must be"):
        merge(boxes, scores, labels, "greedy_nmm", 0.5, "ios", cut=[True])


def test_cut_by_border_marks_boxes_at_inner_borders_only() -> None:
    from app.tiling import cut_by_border

    tile = Tile(100, 0, 200, 200)  # in a 400 x 200 image: inner borders left and right
    boxes = np.asarray([[101, 10, 150, 60],  # at the left border
                        [150, 10, 299, 60],  # at the right border
                        [120, 0, 200, 50],  # at the top, the image's own edge
                        [120, 40, 200, 200],  # at the bottom, the image's own edge
                        [110, 40, 290, 150]], float)  # inside
    assert cut_by_border(boxes, tile, 400, 200, 2.0).tolist() == [
        True, True, False, False, False]
