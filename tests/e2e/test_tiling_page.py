"""The web page's tiling controls in a real headless Chromium (Debian's, driven by Playwright)
against a real service: "off" sends tile=none, a tile size sends tile=<size>, the status line
tells what the answer's tiling was, and "show the tile grid" draws the answer's windows over
the photo without a new request. The page runs under the service's own Content-Security-Policy
(no bypass): Python polls it with ``page.evaluate``, which the policy allows. A screenshot goes
to build/test-artifacts/."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
from playwright.sync_api import Browser, Page

from app.tiling import DEFAULT_OVERLAP, tile_grid
from tests.e2e.test_camera_page import open_page
from tests.e2e.test_web_page import ARTIFACTS, browser  # noqa: F401 (the fixture)
from tests.helpers import Server, encode, render_scene, wait_until

WIDTH, HEIGHT = 1600, 1200  # 5x the shapes model's 320 input: large enough to tile
TILE = 640
EDGE = 3  # pixels either side of a tile's edge where its dashed line may be drawn


def mosaic() -> np.ndarray:
    """A WIDTH x HEIGHT photo of many small shapes: 4 x 3 rendered scenes, 400 px each."""
    cell = HEIGHT // 3
    rows = [np.hstack([cv2.resize(render_scene(40 + 4 * row + col)[0], (cell, cell),
                                  interpolation=cv2.INTER_AREA) for col in range(4)])
            for row in range(3)]
    return np.vstack(rows)


def answer(page: Page) -> dict[str, Any]:
    """The last answer the page showed (its raw JSON panel)."""
    return dict(json.loads(page.text_content("#raw") or "null"))


def shown(page: Page) -> np.ndarray:
    """The canvas's pixels (BGR)."""
    url = page.eval_on_selector("#canvas", "c => c.toDataURL('image/png')")
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
    pixels = cv2.imdecode(data, cv2.IMREAD_COLOR)
    assert pixels is not None
    return np.asarray(pixels)


def edge_bands(tiles: list[dict[str, int]]) -> list[np.ndarray]:
    """For each tile, the four bands (masks) where its outline's sides lie."""
    bands = []
    for t in tiles:
        x0, y0, x1, y1 = t["x"], t["y"], t["x"] + t["width"], t["y"] + t["height"]
        for xs, ys in ((slice(x0, x1), slice(y0, y0 + EDGE)),
                       (slice(x0, x1), slice(y1 - EDGE, y1)),
                       (slice(x0, x0 + EDGE), slice(y0, y1)),
                       (slice(x1 - EDGE, x1), slice(y0, y1))):
            band = np.zeros((HEIGHT, WIDTH), bool)
            band[ys, xs] = True
            bands.append(band)
    return bands


def test_tiling_controls_send_the_tile_and_draw_the_answers_grid(
        server: Server, browser: Browser, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "large.jpg"
    path.write_bytes(encode(mosaic()))
    page, violations = open_page(browser, server.url, 1280, 900)
    sent: list[str] = []  # each /detect request's tile parameter
    page.on("request", lambda r: sent.extend(parse_qs(urlsplit(r.url).query).get("tile", ["?"]))
            if urlsplit(r.url).path.endswith("/detect") else None)

    def answered(requests: int) -> None:
        def seen() -> tuple[list[str], str, int]:
            return sent, page.inner_text("#status"), page.evaluate("window.dfineDrawn.length")

        wait_until(lambda: (now := seen())[0] == sent[:requests] and len(sent) == requests
                   and "detections shown" in now[1] and now[2] > 0 and now, 60,
                   f"answer {requests} on the page")

    # Off (the page's default): tile=none, so a service whose TILE default is on does not tile.
    page.set_input_files("#file", str(path))
    answered(1)
    assert sent == ["none"] and "tiling" not in answer(page)
    assert not page.is_visible("#tiling") and page.evaluate("window.dfineTiles") == []

    # 640 px tiles: a new request with tile=640; the status line tells the answer's tiling.
    page.select_option("#tile", str(TILE))
    wait_until(lambda: page.is_visible("#tiling"), 60, "the tiling status line")
    answered(2)
    assert sent == ["none", str(TILE)]
    tiling = answer(page)["tiling"]
    grid = [{"x": t.x, "y": t.y, "width": t.width, "height": t.height}
            for t in tile_grid(WIDTH, HEIGHT, TILE, DEFAULT_OVERLAP)]
    assert tiling["tile"] == TILE and tiling["tiles"] == grid and len(grid) == 9
    assert tiling["full_image"] is True and tiling["engine_images"] == len(grid) + 1
    runs = tiling["engine_runs"]
    assert page.inner_text("#tiling") == (
        f"{len(grid)} tiles of {TILE} px + whole image, {runs} engine run{'s' * (runs != 1)}")
    assert page.evaluate("window.dfineTiles") == []  # the grid is shown on demand only

    # The grid on: the answer's windows drawn over the photo, under the boxes, no new request.
    # Compared with no boxes drawn (threshold 1): what the grid changed lies on the tiles'
    # outlines, and every side of every tile has its dashes.
    page.fill("#threshold", "1")
    page.dispatch_event("#threshold", "input")
    plain = shown(page)
    page.check("#grid")
    assert page.evaluate("window.dfineTiles") == grid
    gridded = shown(page)
    assert plain.shape == gridded.shape == (HEIGHT, WIDTH, 3)
    changed = np.abs(gridded.astype(int) - plain.astype(int)).max(axis=2) > 24
    bands = edge_bands(grid)
    assert not (changed & ~np.logical_or.reduce(bands)).any()
    for band in bands:
        assert changed[band].mean() > 0.2, "a tile side without its dashed line"
    page.fill("#threshold", "0.5")
    page.dispatch_event("#threshold", "input")
    assert page.evaluate("window.dfineDrawn.length") > 0  # the boxes, over the grid
    assert page.evaluate("window.dfineTiles") == grid
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-tiling.png"), full_page=True)

    # A phone's screen: the controls fit, no sideways scrolling.
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.is_visible("#tile") and page.is_visible("#grid")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 376, width
    page.screenshot(path=str(ARTIFACTS / "web-page-tiling-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})

    # Auto: the service picks the tile; the status line says it was auto's choice.
    page.select_option("#tile", "auto")
    answered(3)
    tiling = answer(page)["tiling"]
    assert sent[-1] == "auto" and tiling["tile"] is not None
    assert page.inner_text("#tiling").startswith(
        f"auto: {len(tiling['tiles'])} tiles of {tiling['tile']} px + whole image, ")
    assert page.evaluate("window.dfineTiles") == tiling["tiles"]

    # Off again: tile=none, no tiling in the answer, no grid drawn though its box is checked.
    page.select_option("#tile", "none")
    answered(4)
    assert sent[-1] == "none" and "tiling" not in answer(page)
    wait_until(lambda: not page.is_visible("#tiling"), 10, "the tiling line hidden")
    assert page.evaluate("window.dfineTiles") == []

    # An answer auto declined to tile (an image near the model's input size) is said so
    # (the page's own function, on such an answer's tiling: no request for it).
    page.evaluate("""() => { state.tile = "auto"; describeTiling({ tile: null, overlap: 0.2,
        full_image: false, tiles: [], engine_images: 1, engine_runs: 1 }); }""")
    assert page.inner_text("#tiling") == "auto: not tiled (the image is small enough), 1 engine run"
    assert violations == []
    page.close()
