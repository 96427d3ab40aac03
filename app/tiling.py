"""Tiled inference's pure core (issue 28): the tile grid, the automatic tile size, tile-local
boxes shifted to the original image, and the merging of the tiles' detections.

Numpy only, no I/O and no service state: the routes, the batcher and the settings build on it.
Sizes and boxes are in the original (upright) image's pixels; boxes are xyxy.

Where this follows SAHI (obss/sahi: ``sahi/slicing.py`` ``get_slice_bboxes``,
``sahi/postprocess/combine.py`` and its numpy backend) and supervision (roboflow/supervision:
``InferenceSlicer``, ``box_non_max_suppression``, ``box_non_max_merge``) and where it differs is
said at each function. In short: the grid is SAHI's (fixed stride from the top-left corner, the
last row and column moved back to end at the image's edge), with the overlap rounded up instead
of down; greedy non-max merging is SAHI's GREEDYNMM (box: the enclosing box of those absorbed,
score: the highest, the keeper's label), with ``>=`` throughout where SAHI's final merge step
uses ``>``. Neither library drops a detection cut by an inner tile border before merging (SAHI's
``min_area_ratio`` is for slicing a COCO data set's annotations, not for predictions), so this
module does not either: the cut pieces are what greedy merging on intersection-over-smaller
puts back together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

MergeMethod = Literal["nms", "greedy_nmm", "none"]
MatchMetric = Literal["iou", "ios"]

MERGE_METHODS: tuple[MergeMethod, ...] = ("nms", "greedy_nmm", "none")
MATCH_METRICS: tuple[MatchMetric, ...] = ("iou", "ios")

# tile=auto (see auto_tile): no tiling up to this many times the model's input (long side)...
AUTO_MIN_FACTOR = 2.0
# ...else the smallest tile, in steps of half the input size, whose grid has at most this many
# tiles at this overlap (SAHI's and the default overlap).
AUTO_MAX_TILES = 16
AUTO_OVERLAP = 0.2

# Merging compares blocks of boxes, each with the boxes its x-range reaches: at most this many
# rows, and as many as keep a block within this many pairs (or one row), which bounds the
# temporaries (a few float64 arrays of that many pairs) however the boxes crowd together.
_BLOCK_ROWS = 4096
_BLOCK_CELLS = 1 << 18


# Defaults of a request's tiling: SAHI's (get_sliced_prediction: 0.2 overlap, the whole-image
# pass on, intersection-over-smaller at 0.5), but NMS where SAHI merges greedily: measured on
# the held-out set under tile=auto, NMS gained 0.024 AP over untiled and greedy merging lost
# 0.018 (docs/tiling.md, "Accuracy and cost").
DEFAULT_OVERLAP = AUTO_OVERLAP
DEFAULT_MERGE: MergeMethod = "nms"
DEFAULT_MERGE_THRESHOLD = 0.5
DEFAULT_MERGE_METRIC: MatchMetric = "ios"
MIN_TILE = 32  # pixels: a window smaller than this is no image a detector can read
MAX_TILE = 1 << 16


@dataclass(frozen=True)
class Tiling:
    """How one request asks for its image to be tiled: ``tile`` a size in the original image's
    pixels or "auto" (``auto_tile``: none for an image near the model's input size); the
    tiles' ``overlap``; how their detections are merged (``merge``, ``merge_threshold``,
    ``merge_metric``, ``class_aware``); ``full_image``: the whole image is run too, and its
    detections merged with the tiles' (SAHI's ``perform_standard_pred``)."""

    tile: int | Literal["auto"] = "auto"
    overlap: float = DEFAULT_OVERLAP
    merge: MergeMethod = DEFAULT_MERGE
    merge_threshold: float = DEFAULT_MERGE_THRESHOLD
    merge_metric: MatchMetric = DEFAULT_MERGE_METRIC
    full_image: bool = True
    class_aware: bool = True

    def __post_init__(self) -> None:
        if self.tile != "auto" and not (isinstance(self.tile, int)
                                        and MIN_TILE <= self.tile <= MAX_TILE):
            raise ValueError(f"tile must be auto or {MIN_TILE} to {MAX_TILE} pixels, "
                             f"got {self.tile!r}")
        if not (math.isfinite(self.overlap) and 0.0 <= self.overlap <= 0.9):
            raise ValueError(f"tile_overlap must be in [0, 0.9], got {self.overlap}")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"tile_merge must be one of {', '.join(MERGE_METHODS)}, "
                             f"got {self.merge!r}")
        if self.merge_metric not in MATCH_METRICS:
            raise ValueError(f"tile_merge_metric must be one of {', '.join(MATCH_METRICS)}, "
                             f"got {self.merge_metric!r}")
        if not (math.isfinite(self.merge_threshold) and 0.0 < self.merge_threshold <= 1.0):
            raise ValueError(f"tile_merge_threshold must be in (0, 1], "
                             f"got {self.merge_threshold}")

    def tile_size(self, width: int, height: int, input_size: tuple[int, int],
                  max_tiles: int) -> int | None:
        """The tile size for a ``width`` x ``height`` (upright) image, None for no tiling: an
        "auto" that declines, or a tile that covers the whole image."""
        if self.tile == "auto":
            return auto_tile(width, height, input_size, overlap=self.overlap,
                             max_tiles=min(max_tiles, AUTO_MAX_TILES))
        return None if self.tile >= max(width, height) else self.tile


def parse_tile(text: str) -> int | Literal["auto"] | None:
    """A ``tile`` setting or parameter: "auto", a size in pixels, or "none"/"off"/"0"/"" (no
    tiling: None). ValueError on anything else."""
    value = text.strip().lower()
    if value in ("", "none", "off", "0", "false"):
        return None
    if value == "auto":
        return "auto"
    if value.isascii() and value.isdigit() and len(value) <= 6:
        size = int(value)
        if MIN_TILE <= size <= MAX_TILE:
            return size
    raise ValueError(f"tile must be auto, none, or a size of {MIN_TILE} to {MAX_TILE} pixels; "
                     f"got {text[:32]!r}")


@dataclass(frozen=True)
class Tile:
    """A window of the original image, in its pixels: columns x..x+width, rows y..y+height."""

    x: int
    y: int
    width: int
    height: int


def _check_grid(width: int, height: int, tile: int, overlap: float) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not (math.isfinite(overlap) and 0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


def _stride(tile: int, overlap: float) -> int:
    """Pixels from one window's start to the next one's: the tile less its overlap, the overlap
    rounded up so that neighbours share at least ``overlap`` of the tile (SAHI rounds it down,
    ``int(overlap * tile)``, and supervision takes it in pixels; 0.2 of 320 is 64 in all three,
    0.2 of 333 is 67 here and 66 in SAHI). The small epsilon keeps float noise (0.1 * 30 is
    3.0000000000000004) from adding a pixel. At least 1: an overlap above tile - 1 pixels can't
    be met by distinct windows, and stride 1 is the closest."""
    overlap_px = math.ceil(overlap * tile - 1e-9)
    return max(1, tile - overlap_px)


def _axis_starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: 0, stride, 2 x stride... while a window still ends before
    the image's edge, then one that ends exactly at the edge (``size - tile``), whatever its
    overlap with the one before. One window (at 0) where the image is no longer than a tile."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, stride), size - tile]


def _axis_count(size: int, tile: int, stride: int) -> int:
    """``len(_axis_starts(...))`` without building it."""
    return 1 if size <= tile else -(-(size - tile) // stride) + 1


def tile_grid(width: int, height: int, tile: int, overlap: float) -> list[Tile]:
    """The windows of ``tile`` x ``tile`` pixels (clamped to the image along an axis where the
    image is smaller) that cover a ``width`` x ``height`` image, edges included, each pair of
    neighbours overlapping by at least ``overlap`` (0 <= overlap < 1) of the tile, in row-major
    order (top row first, left to right), no window twice.

    SAHI's ``get_slice_bboxes`` builds the same windows (a fixed stride from the top-left corner,
    the last column and row moved back so that they end at the image's edge and keep the full
    tile size), except for the overlap's rounding (see ``_stride``). supervision's
    ``InferenceSlicer`` does the same when the overlap is positive, but with no overlap it
    clips the last window (a smaller one) instead of moving it back; here every window has the
    full tile size wherever the image is at least a tile, so the model sees each at the same
    scale. Not done: spreading the windows evenly (equal overlaps), which would change SAHI's
    grid that users of ``get_sliced_prediction`` know; the last pair simply overlaps more.
    """
    _check_grid(width, height, tile, overlap)
    stride = _stride(tile, overlap)
    tile_w, tile_h = min(tile, width), min(tile, height)
    return [Tile(x, y, tile_w, tile_h)
            for y in _axis_starts(height, tile, stride)
            for x in _axis_starts(width, tile, stride)]


def tile_count(width: int, height: int, tile: int, overlap: float) -> int:
    """``len(tile_grid(width, height, tile, overlap))``, in constant time: for checking a
    request against a tile limit from the image's header, before decoding it or building the
    grid (an overlap near 1 can ask for millions of windows)."""
    _check_grid(width, height, tile, overlap)
    stride = _stride(tile, overlap)
    return _axis_count(width, tile, stride) * _axis_count(height, tile, stride)


def auto_tile(width: int, height: int, input_size: tuple[int, int], *,
              overlap: float = AUTO_OVERLAP, max_tiles: int = AUTO_MAX_TILES) -> int | None:
    """The tile size for ``tile=auto``: None (no tiling) for an image near the model's input
    size, else a tile a few times the input size. ``input_size`` is the model's (width, height).

    No tiling while the image's long side is at most ``AUTO_MIN_FACTOR`` (2) times the input's
    long side. The model sees the image shrunk by at most 2 then, and the least a grid can do
    about it is tiles of the input size: at 2x, 3 x 3 = 9 engine runs (at 0.2 overlap) for
    objects twice as large, each object near a border cut in pieces that merging must put back.
    Halving is within the scale range a detector is trained for (D-FINE's multi-scale training
    and random zoom-out shrink objects that much), so the gain is small and the cost and the
    risk are not; and the ordinary images (our held-out set: 240 to 1280 pixels a side, objects
    of 8 to 50 % of the short side) must not get worse under ``tile=auto``.

    Beyond that: the smallest tile among input, 1.5 x input, 2 x input... (steps of half the
    input's long side) whose grid at ``overlap`` has at most ``max_tiles`` (16) windows: the
    finest resolution a modest number of engine runs buys. 16 is two GPU batches at the default
    MAX_BATCH_SIZE (8); for a 4:3 image it means a 4 x 3 grid, tiles of about a third of the
    long side, so objects come out about 3x larger than untiled. Tiles never below the input
    size: a tile smaller than the model's input is upscaled, which adds no detail. Examples
    (overlap 0.2; tile: columns x rows = tiles; "gain": the image's long side over the tile):

        image       320 model                     640 model
        640x480     None                          None
        1920x1080   480: 5 x 3 = 15, gain 4       640: 4 x 2 = 8, gain 3
        4000x3000   1280: 4 x 3 = 12, gain 3.1    1280: 4 x 3 = 12, gain 3.1
        8000x6000   2400: 4 x 3 = 12, gain 3.3    2560: 4 x 3 = 12, gain 3.1
        2048x2048   640: 4 x 4 = 16, gain 3.2     640: 4 x 4 = 16, gain 3.2

    (For 4000x3000 a 320 model gets no finer tiles than a 640 one: 640-pixel tiles would take
    48 runs. Those who want them ask for ``tile=640``.)

    SAHI's ``auto_slice_resolution`` sizes its slices from the image alone (a quarter or
    an eighth of a side, with 0.4 to 0.8 overlap, by the image's pixel count) and never declines
    to slice; supervision has no automatic size.
    """
    input_long = max(input_size)
    if input_long < 1 or min(input_size) < 1:
        raise ValueError(f"input size must be positive, got {input_size}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    _check_grid(width, height, input_long, overlap)
    long_side = max(width, height)
    if long_side <= AUTO_MIN_FACTOR * input_long:
        return None
    step = max(1, input_long // 2)
    tile = input_long
    while tile < long_side and tile_count(width, height, tile, overlap) > max_tiles:
        tile += step
    return tile if tile < long_side else None


def shift(boxes: npt.ArrayLike, tile: Tile) -> npt.NDArray[np.floating]:
    """Boxes (k, 4) xyxy in a tile's pixels moved to the original image's pixels. A new array,
    floating (of the boxes' type if they are floating, else float64)."""
    array = np.asarray(boxes)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be (k, 4), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    offset = np.asarray([tile.x, tile.y, tile.x, tile.y], dtype=array.dtype)
    shifted: npt.NDArray[np.floating] = array + offset
    return shifted


def merge(boxes: npt.ArrayLike, scores: npt.ArrayLike, labels: npt.ArrayLike,
          method: MergeMethod, threshold: float, metric: MatchMetric,
          class_aware: bool = True, cut: npt.ArrayLike | None = None,
          ) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating], npt.NDArray[np.integer]]:
    """Detections from the tiles (and the whole-image pass), in original pixels, merged:
    ``(boxes (n, 4), scores (n,), labels (n,))`` sorted by score, highest first.

    boxes (k, 4) xyxy, scores (k,), labels (k,) integers. Two detections match when their
    overlap (``metric``: "iou", intersection over union, or "ios", intersection over the
    smaller box's area) is at least ``threshold`` (0 < threshold <= 1); boxes that merely touch
    never match. With ``class_aware`` only detections of one label are compared. Detections are
    taken best first (by score; ties by x1, y1, x2, y2, as SAHI orders them):

    - "nms": a detection not yet dropped is kept and drops the later ones that match it.
    - "greedy_nmm" (SAHI's GREEDYNMM, the default of ``get_sliced_prediction``): a detection
      not yet absorbed is kept and absorbs the later, unabsorbed ones that match it; then, in
      order, each absorbed one that still matches the kept box as it has grown so far widens it
      to the box enclosing both (the others are dropped: they matched the kept box but no longer
      match what it became). The kept detection keeps its score (the highest of those it
      absorbed, SAHI's ``get_merged_score``) and its label. A box cut by a tile border comes
      back whole: its pieces overlap in the tiles' overlap, by a large share of the smaller
      piece (hence "ios"), and their enclosing box is the object's.
    - "none": all of them (``threshold`` and ``metric`` are not used).

    ``cut`` (k,) booleans, for "greedy_nmm": only a kept detection marked cut (one that reaches
    an inner border of its tile: ``cut_by_border``) grows; one that is not still absorbs its
    matches but keeps its own box, as NMS would. SAHI grows every kept box, and so does this
    without ``cut``: a confident box that lies inside a larger, weaker one (a false positive
    spanning several objects, or a larger object of its class) then takes that box's size. A
    box whole within its tile has nothing to grow into; the pieces of an object cut by a border
    do, and at least the piece kept reaches the border.

    Compared with SAHI, whose merge step (``_apply_merge``, ``has_match``) re-checks each
    absorbed box against the growing box with ``>`` after grouping them with ``>=``: here both
    use ``>=``, so a box exactly at the threshold is merged instead of silently dropped; in
    class-agnostic merging the kept detection's label stays where SAHI takes the absorbed one's
    on a tie in score. supervision's ``with_nmm`` differs more: no re-check, and the merged
    score is the area-weighted mean of the two; its NMS drops on ``>``.

    Cost: overlaps are computed only for pairs whose x-ranges meet (a sort and sweep, in blocks
    of numpy arithmetic; with ``class_aware`` the labels are laid side by side on the x-axis so
    that two labels never meet), and the greedy pass visits each detection once. 5,000 random
    boxes over a 4000-pixel image take about 4 to 30 ms, 5,000 piled into one 800-pixel square
    (every pair a candidate) 100 to 150 ms, on one CPU core.
    """
    boxes_in, scores_in, labels_in = _check_detections(boxes, scores, labels)
    grows = None if cut is None else np.asarray(cut, bool)
    if grows is not None and grows.shape != scores_in.shape:
        raise ValueError(f"cut must be ({len(scores_in)},), got {grows.shape}")
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    if metric not in MATCH_METRICS:
        raise ValueError(f"metric must be one of {', '.join(MATCH_METRICS)}, got {metric!r}")
    if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")

    # Best first; from here on a detection's index is its rank.
    order = np.lexsort((boxes_in[:, 3], boxes_in[:, 2], boxes_in[:, 1], boxes_in[:, 0],
                        -scores_in))
    boxes_out, scores_out, labels_out = boxes_in[order], scores_in[order], labels_in[order]
    if grows is not None:
        grows = grows[order]
    count = len(order)
    if method == "none" or count < 2:
        return boxes_out, scores_out, labels_out

    ranked = boxes_out.astype(np.float64)
    src, dst = _matches(ranked, labels_out if class_aware else None, threshold, metric)
    dropped = np.zeros(count, bool)
    # CSR over the sources: the later detections matching detection s are dst[starts[s]:...].
    csr = np.searchsorted(src, np.arange(count + 1))
    starts: list[int] = csr.tolist()
    sources: list[int] = np.flatnonzero(csr[1:] > csr[:-1]).tolist()  # in rank order
    if method == "nms":
        for s in sources:
            if not dropped[s]:
                dropped[dst[starts[s]:starts[s + 1]]] = True
    else:
        rows: list[list[float]] = ranked.tolist()
        for s in sources:
            if dropped[s]:
                continue
            absorbed = dst[starts[s]:starts[s + 1]]
            absorbed = absorbed[~dropped[absorbed]]
            if not absorbed.size:
                continue
            dropped[absorbed] = True
            if grows is not None and not grows[s]:
                continue  # whole within its tile: it keeps its box
            kept = rows[s]
            for other in absorbed.tolist():
                if _match_one(kept, rows[other], threshold, metric):
                    kept = _enclosing(kept, rows[other])
            boxes_out[s] = kept  # min/max of the inputs: exact in their own type
    survivors = np.flatnonzero(~dropped)
    return boxes_out[survivors], scores_out[survivors], labels_out[survivors]


def cut_by_border(boxes: npt.NDArray[np.floating], tile: Tile, width: int, height: int,
                  margin: float) -> npt.NDArray[np.bool_]:
    """(k,) booleans: which boxes (xyxy, in the original's pixels) reach within ``margin``
    pixels of an inner border of ``tile`` in a ``width`` x ``height`` image (a border that is
    not the image's own edge), where the tile may have cut what they show."""
    reach = np.zeros(len(boxes), bool)
    if tile.x > 0:
        reach |= boxes[:, 0] <= tile.x + margin
    if tile.y > 0:
        reach |= boxes[:, 1] <= tile.y + margin
    if tile.x + tile.width < width:
        reach |= boxes[:, 2] >= tile.x + tile.width - margin
    if tile.y + tile.height < height:
        reach |= boxes[:, 3] >= tile.y + tile.height - margin
    return reach


def _check_detections(boxes: npt.ArrayLike, scores: npt.ArrayLike, labels: npt.ArrayLike,
                      ) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating],
                                 npt.NDArray[np.integer]]:
    box_array = np.asarray(boxes)
    score_array = np.asarray(scores)
    label_array = np.asarray(labels)
    if box_array.size == 0 and box_array.ndim < 2:
        box_array = box_array.reshape(0, 4)
    if box_array.ndim != 2 or box_array.shape[1] != 4:
        raise ValueError(f"boxes must be (k, 4), got shape {box_array.shape}")
    count = box_array.shape[0]
    if score_array.shape != (count,) or label_array.shape != (count,):
        raise ValueError(f"scores and labels must be ({count},), got {score_array.shape} and "
                         f"{label_array.shape}")
    if not np.issubdtype(box_array.dtype, np.floating):
        box_array = box_array.astype(np.float64)
    if not np.issubdtype(score_array.dtype, np.floating):
        score_array = score_array.astype(np.float64)
    if count and not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {label_array.dtype}")
    if not np.issubdtype(label_array.dtype, np.integer):
        label_array = label_array.astype(np.int64)
    if not (np.isfinite(box_array).all() and np.isfinite(score_array).all()):
        raise ValueError("boxes and scores must be finite")
    return box_array, score_array, label_array


def _matches(boxes: npt.NDArray[np.float64], labels: npt.NDArray[np.integer] | None,
             threshold: float, metric: MatchMetric,
             ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The matching pairs (i < j) of ranked boxes, sorted by i then j: (i's, j's).

    Sort and sweep on x: in x1 order, box p can only intersect the boxes after it whose x1 is
    below its x2, the next ``window[p]`` ones (one ``searchsorted``). Blocks of consecutive
    boxes are compared with their windows by broadcasting, the pairs past a box's own window
    masked. Labels (when given) each get a band of the x-axis of their own, one pixel apart,
    so boxes of two labels are never in one window; the label test makes that exact whatever
    rounding does to the shifted keys, which only choose the candidates. Half a pixel of slack
    in the sweep likewise only adds candidates, which the exact overlap test then decides on.
    """
    count = len(boxes)
    key1, key2 = boxes[:, 0], boxes[:, 2]
    if labels is not None:
        band = np.unique(labels, return_inverse=True)[1].reshape(-1)
        low = float(min(key1.min(), key2.min()))
        span = float(max(key1.max(), key2.max())) - low + 1.0
        key1 = key1 - low + band * span
        key2 = key2 - low + band * span
    by_x = np.argsort(key1, kind="stable")
    ends = np.searchsorted(key1[by_x], key2[by_x] + 0.5, side="right")
    # row p's candidates are p+1 .. p+window[p]: a band along the diagonal, read as a sliding
    # window over the sorted columns (a view: no index arrays, no copies)
    window = np.maximum(ends - np.arange(count) - 1, 0)
    widest = int(window.max())
    if widest == 0:
        empty = np.zeros(0, np.intp)
        return empty, empty
    padded = np.zeros((4, count + widest))
    padded[:, :count] = boxes[by_x].T
    x1, y1, x2, y2 = padded
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    views = [sliding_window_view(column, widest)[1:] for column in (x1, y1, x2, y2, area)]
    group = None
    if labels is not None:
        group = np.zeros(count + widest, labels.dtype)
        group[:count] = labels[by_x]
    offsets = np.arange(widest)

    found_i: list[npt.NDArray[np.intp]] = []
    found_j: list[npt.NDArray[np.intp]] = []
    last = 0
    while last < count:
        # rows first..last-1, each against the next `width` boxes: as many rows as keep the
        # block within _BLOCK_CELLS pairs (or one row)
        first = last
        widths = np.maximum.accumulate(window[first:first + _BLOCK_ROWS])
        cells = np.arange(1, len(widths) + 1) * widths
        taken = max(1, int(np.searchsorted(cells, _BLOCK_CELLS, side="right")))
        last, width = first + taken, int(widths[taken - 1])
        if width == 0:
            continue
        rows = slice(first, last)
        col_x1, col_y1, col_x2, col_y2, col_area = (view[rows, :width] for view in views)
        inter = np.minimum(x2[rows, None], col_x2)
        inter -= np.maximum(x1[rows, None], col_x1)
        np.clip(inter, 0, None, out=inter)
        height = np.minimum(y2[rows, None], col_y2)
        height -= np.maximum(y1[rows, None], col_y1)
        np.clip(height, 0, None, out=height)
        inter *= height
        if metric == "iou":
            denominator = np.add(area[rows, None], col_area)
            denominator -= inter
        else:
            denominator = np.minimum(area[rows, None], col_area)
        # inter / denominator >= threshold, without dividing by zero: inter > 0 makes the
        # denominator (an area at least as large as inter) positive
        hit = offsets[None, :width] < window[rows, None]
        hit &= inter > 0
        hit &= np.divide(inter, denominator, out=np.zeros_like(inter), where=hit) >= threshold
        if group is not None:
            hit &= group[rows, None] == sliding_window_view(group, width)[first + 1:last + 1]
        row_hit, col_hit = np.nonzero(hit)
        row_hit += first
        a, b = by_x[row_hit], by_x[row_hit + 1 + col_hit]
        found_i.append(np.minimum(a, b))
        found_j.append(np.maximum(a, b))
    if not found_i:
        empty = np.zeros(0, np.intp)
        return empty, empty
    pairs = np.concatenate(found_i) * count + np.concatenate(found_j)
    pairs.sort()
    first_of_pair, second_of_pair = np.divmod(pairs, count)
    return first_of_pair, second_of_pair


def _match_one(first: list[float], second: list[float], threshold: float,
               metric: MatchMetric) -> bool:
    """The pair test of ``_matches`` for two boxes, in Python floats (the same float64 sums)."""
    inter = (max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
             * max(0.0, min(first[3], second[3]) - max(first[1], second[1])))
    area_first = max(0.0, first[2] - first[0]) * max(0.0, first[3] - first[1])
    area_second = max(0.0, second[2] - second[0]) * max(0.0, second[3] - second[1])
    if metric == "iou":
        denominator = area_first + area_second - inter
    else:
        denominator = min(area_first, area_second)
    return inter > 0 and denominator > 0 and inter / denominator >= threshold


def _enclosing(first: list[float], second: list[float]) -> list[float]:
    return [min(first[0], second[0]), min(first[1], second[1]),
            max(first[2], second[2]), max(first[3], second[3])]
