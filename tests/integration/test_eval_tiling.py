"""``dfine-serve eval``'s tiling options (issue 28): sent to a real service as its tile* query
parameters and in-process as DetectParams.tiling, recorded in the result with the answers'
tiling reports; on small objects, tiles must beat the whole image."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.bench.evaluate import main, tile_label, tile_query
from app.tiling import Tiling
from models.synthetic import SmallScene, write_split
from tests.helpers import DEFAULT_MODEL, Server, run_server

# 640 x 640 scenes of 16-40 px shapes: 0.5 x untiled (the model's input is 320), 1 x in tiles
# of 320 (3 x 3 of them at 0.2 overlap). Small enough for a quick run on a loaded machine.
SCENE = SmallScene(640, 640, 16, 40, 20, 40)
TILED = ["--tile", "320", "--tile-merge", "nms", "--no-tile-full-image"]
TILING = {"tile": 320, "overlap": 0.2, "merge": "nms", "merge_threshold": 0.5,
          "merge_metric": "ios", "full_image": False, "class_aware": True}


@pytest.fixture(scope="module")
def small_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_split(root, "val", 6, seed=0, workers=1, small=SCENE)
    return root / "val"


@pytest.fixture(scope="module")
def tiling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Tiles by default (TILE=auto), so that an untiled evaluation must say tile=none; a short
    queue, so that concurrent tiled images are refused as overloaded and sent again."""
    with run_server(tmp_path_factory.mktemp("server"), "--tile", "auto", "--max-queue", "9",
                    "--max-delay-ms", "5") as running:
        yield running


def _report(args: list[str], out: Path) -> dict[str, Any]:
    main([*args, "--out", str(out)])
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_tiles_beat_the_whole_image_over_http_and_tile_none_is_sent(
        tiling_server: Server, small_split: Path, tmp_path: Path) -> None:
    report = _report(["--data", str(small_split), "--url", tiling_server.url, *TILED,
                      "--compare-tile", "none", "--concurrency", "4"], tmp_path / "eval.json")
    tiled, whole = report["results"]
    assert tiled["target"] == "service:tile=320,no-full-image"
    assert tiled["tiling"] == TILING and tiled["images"] == 6
    assert tiled["tiled_images"] == 6 and tiled["tiles_per_image"] == 9
    assert tiled["engine_images_per_image"] == 9 and tiled["engine_runs_per_image"] >= 1
    # Four clients, nine places an image, a queue of nine: an image that finds another one's
    # places held (for its nine engine runs) is refused as overloaded, and sent again.
    assert tiled["overloaded_retries"] > 0
    # tile=none went out: the service's TILE=auto would have tiled these 640-pixel images.
    assert whole["target"] == "service:tile=none" and whole["tiling"] == "none"
    assert "tiled_images" not in whole
    assert tiled["APs"] >= 0.5 and tiled["AP"] >= 2 * whole["AP"], report


def test_in_process_tiling_matches_the_service_and_defaults_follow_the_settings(
        tiling_server: Server, small_split: Path, tmp_path: Path) -> None:
    over_http = _report(["--data", str(small_split), "--url", tiling_server.url, *TILED,
                         "--limit", "3"], tmp_path / "http.json")["results"][0]
    # In-process: the request's tiling from the options; without --tile, from --set tile=...
    report = _report(["--data", str(small_split), "--model", str(DEFAULT_MODEL), "--providers",
                      "cpu", *TILED, "--limit", "3", "--compare-tile", "none", "--set",
                      "tile=auto"], tmp_path / "in-process.json")
    tiled, whole = report["results"]
    assert tiled["target"] == ("dfine_n_shapes.onnx:cpu:fp32:tile=auto:"
                               "tile=320,no-full-image")
    assert tiled["tiling"] == TILING and tiled["tiles_per_image"] == 9
    assert abs(tiled["AP"] - over_http["AP"]) <= 0.002  # the same code, without HTTP
    assert whole["tiling"] == "none" and "tiled_images" not in whole
    default = _report(["--data", str(small_split), "--model", str(DEFAULT_MODEL), "--providers",
                       "cpu", "--set", "tile=auto", "--limit", "1"], tmp_path / "default.json")
    row = default["results"][0]
    assert row["tiling"] is None and row["tiled_images"] == 1  # TILE=auto: 640 px, no tiles
    assert row["tiles_per_image"] == 0 and row["engine_images_per_image"] == 1


def test_tiling_options_are_spelled_out_and_named() -> None:
    tiling = Tiling(480, overlap=0.3, merge_metric="iou", full_image=False, class_aware=False)
    assert tile_query(tiling) == {
        "tile": "480", "tile_overlap": "0.3", "tile_merge": "nms",
        "tile_merge_threshold": "0.5", "tile_merge_metric": "iou",
        "tile_full_image": "false", "tile_class_aware": "false"}
    assert tile_query("none") == {"tile": "none"} and tile_query(None) == {}
    assert tile_label(tiling) == "tile=480,overlap=0.3,merge_metric=iou,class_aware=False," \
                                 "no-full-image"
    assert tile_label(Tiling("auto")) == "tile=auto" and tile_label(None) == ""


@pytest.mark.parametrize("args", [
    ["--tile-overlap", "0.3"],  # nothing to tile
    ["--tile", "none", "--tile-merge", "nms"],
    ["--tile", "16"],  # under 32 pixels
    ["--tile", "auto", "--tile-overlap", "0.95"],
    ["--tile", "auto", "--tile-merge-threshold", "0"],
    ["--tile", "auto", "--compare-tile", "none", "--compare-url", "http://127.0.0.1:1"],
    ["--tile", "auto", "--score-threshold", "1.5"],
])
def test_bad_tiling_options_stop_before_any_work(args: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--data", str(tmp_path), "--url", "http://127.0.0.1:1", *args])
    assert stopped.value.code != 0
