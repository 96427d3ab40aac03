"""The web page in a real headless Chromium (Debian's, driven by Playwright): upload a rendered
image, check that the boxes drawn are the API's, filter with the slider, and look at it on a
phone-sized screen. Screenshots go to build/test-artifacts/."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.helpers import ROOT, Server, box_iou, encode, render_scene
from tests.orientation_images import alike, stored_jpeg, upright_scene

ARTIFACTS = ROOT / "build" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's Chromium, headless, with the background services that would reach the network off.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


def test_page_draws_the_apis_boxes_and_filters_on_the_client(
        server: Server, browser: Browser, tmp_path: Path) -> None:
    image, _ = render_scene(31)
    path = tmp_path / "scene.png"
    path.write_bytes(encode(image, ".png"))
    api = httpx.post(f"{server.url}/detect?score_threshold=0&max_detections=300",
                     content=path.read_bytes(), headers={"Content-Type": "image/png"},
                     timeout=30).json()["detections"]
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's policy
    # forbids (the policy itself is tested below, without it).
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page.goto(server.url + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("window.dfineDrawn.length > 0", timeout=20_000)
    drawn = page.evaluate("window.dfineDrawn")
    expected = [d for d in api if d["score"] >= 0.5]  # the slider starts at 0.5
    assert [d["label"] for d in drawn] == [d["label"] for d in expected]
    for got, want in zip(drawn, expected):
        assert box_iou(tuple(got["box"].values()), tuple(want["box"].values())) > 0.999
    canvas = page.eval_on_selector("#canvas", "c => [c.width, c.height]")
    assert canvas == [image.shape[1], image.shape[0]]
    assert "detections shown" in page.inner_text("#status")
    assert page.inner_text("#timing")  # the timing breakdown
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    page.fill("#threshold", "0.9")  # the slider filters without a new request
    page.dispatch_event("#threshold", "input")
    high = page.evaluate("window.dfineDrawn")
    assert len(high) == sum(d["score"] >= 0.9 for d in api)
    first_label = drawn[0]["label"]
    page.fill("#threshold", "0.5")
    page.dispatch_event("#threshold", "input")
    page.locator("#classes label", has_text=first_label).locator("input").uncheck()
    filtered = page.evaluate("window.dfineDrawn")
    assert all(d["label"] != first_label for d in filtered)
    assert len(filtered) == sum(d["score"] >= 0.5 and d["label"] != first_label for d in api)

    merged_api = httpx.post(f"{server.url}/detect?score_threshold=0.5&dedupe_iou=0.7",
                            content=path.read_bytes(), headers={"Content-Type": "image/png"},
                            timeout=30).json()["detections"]
    page.locator("#classes input").first.check()  # all classes again
    page.check("#dedupe")  # "merge duplicates" asks the API again, with dedupe_iou
    page.wait_for_function(f"window.dfineDrawn.length === {len(merged_api)}", timeout=20_000)
    assert [d["label"] for d in page.evaluate("window.dfineDrawn")] == [
        d["label"] for d in merged_api]
    page.close()


def test_page_fits_a_phone_screen_and_shows_errors(server: Server, browser: Browser,
                                                   tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 375, "height": 812}, is_mobile=True,
                            bypass_csp=True)
    page.goto(server.url + "/")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.querySelector('#status').className === 'error'",
                           timeout=20_000)
    assert "invalid_image" in page.inner_text("#status")
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(render_scene(32)[0]))
    page.set_input_files("#file", str(good))
    page.wait_for_function("window.dfineDrawn.length > 0", timeout=20_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 376, width  # no sideways scrolling
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-phone.png"), full_page=True)
    page.set_input_files("#file", str(bad))  # a failure clears the earlier boxes
    page.wait_for_function("document.querySelector('#status').className === 'error'",
                           timeout=20_000)
    assert page.evaluate("window.dfineDrawn") == []
    assert page.eval_on_selector("#canvas", "c => c.width") == 0
    assert page.locator("#detections li").count() == 0
    page.close()


def test_api_docs_render_offline_under_their_policy(server: Server, browser: Browser) -> None:
    page = browser.new_page()
    outside: list[str] = []
    violations: list[str] = []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        server.url) else (outside.append(route.request.url), route.abort()))
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock", timeout=20_000)  # the operations, from /openapi.json
    assert page.locator(".opblock").count() >= 5
    assert outside == [] and violations == []
    page.goto(server.url + "/")  # the page's inline script and style pass its policy
    page.wait_for_selector("#classes", state="attached", timeout=10_000)
    page.wait_for_load_state("networkidle")
    assert violations == []
    page.close()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_page_shows_a_turned_photo_upright_with_its_boxes(
        server: Server, browser: Browser, tmp_path: Path, orientation: int) -> None:
    """A photo stored turned, tagged to be shown upright: the browser shows it upright, and
    the boxes the page draws (the API's) are in that frame, over the objects."""
    upright, truth = upright_scene()
    path = tmp_path / f"photo-{orientation}.jpg"
    path.write_bytes(stored_jpeg(orientation))
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page.goto(server.url + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("window.dfineDrawn.length > 0", timeout=20_000)
    drawn = page.evaluate("window.dfineDrawn")
    assert page.eval_on_selector("#canvas", "c => [c.width, c.height]") == [
        upright.shape[1], upright.shape[0]]
    found = sum(any(d["label"] == label and box_iou(tuple(d["box"].values()), box) >= 0.5
                    for d in drawn) for label, box in truth)
    assert found >= 0.8 * len(truth), (found, len(truth))
    page.fill("#threshold", "1")  # nothing drawn over the photo: compare its pixels
    page.dispatch_event("#threshold", "input")
    url = page.eval_on_selector("#canvas", "c => c.toDataURL('image/png')")
    shown = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8),
                         cv2.IMREAD_COLOR)
    assert alike(shown, upright)
    if orientation == 6:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-orientation-6.png"), full_page=True)
    page.close()


def test_the_model_picker_sends_detections_to_the_model_chosen(
        browser: Browser, tmp_path: Path) -> None:
    from tests import onnx_models
    from tests.helpers import DEFAULT_MODEL, run_server

    repository = tmp_path / "repository"
    (repository / "shapes" / "1").mkdir(parents=True)
    (repository / "shapes" / "1" / "model.onnx").symlink_to(DEFAULT_MODEL)
    (repository / "tiny" / "3").mkdir(parents=True)
    onnx_models.official(repository / "tiny" / "3" / "model.onnx", labels=["bolt", "nut"])
    image, _ = render_scene(31)
    path = tmp_path / "scene.png"
    path.write_bytes(encode(image, ".png"))
    with run_server(tmp_path, "--model-repository", str(repository),
                    "--default-model", "shapes") as server:
        tiny = httpx.post(f"{server.url}/detect?model=tiny&score_threshold=0.5",
                          content=path.read_bytes(), headers={"Content-Type": "image/png"},
                          timeout=30).json()["detections"]
        page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#modelPick option').length == 2",
                               timeout=20_000)
        assert page.is_visible("#modelPick")
        assert page.eval_on_selector("#modelPick", "s => s.value") == "shapes/1"  # the default
        page.select_option("#modelPick", "tiny/3")
        assert "64×64" in page.inner_text("#model")
        page.set_input_files("#file", str(path))
        page.wait_for_function("window.dfineDrawn.length > 0", timeout=20_000)
        drawn = page.evaluate("window.dfineDrawn")
        assert [d["label"] for d in drawn] == ["nut"] == [d["label"] for d in tiny]
        assert box_iou(tuple(drawn[0]["box"].values()), tuple(tiny[0]["box"].values())) > 0.999
        assert '"version": 3' in (page.text_content("#raw") or "")
        page.close()
