"""The web page's camera mode in a real headless Chromium (Debian's, driven by Playwright) whose
fake camera plays tests/video/scene.py's video: the page sends the frames over the WebSocket to
a real service and draws the detections, with track ids, over the live video. The pages run
under the service's own Content-Security-Policy (no bypass): Python polls them with
``page.evaluate``, which the policy allows. Screenshots go to build/test-artifacts/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.e2e.test_web_page import ARGS, ARTIFACTS, CHROMIUM
from tests.helpers import Server, box_iou, metric, run_server, wait_until
from tests.video import scene

FPS = 10
FORWARD = 30  # frames 0..29, then back to 1: the camera loops the file without a jump
LOOP = [*range(FORWARD), *range(FORWARD - 2, 0, -1)]
KEY = "camera-key"
STATS = re.compile(r"sent [\d.]+ fps · answered [\d.]+ fps · dropped \d+ · round trip \d+ ms")


def write_y4m(path: Path, frames: list[int]) -> None:
    """scene.frame(k) for each k, as the uncompressed YUV 4:2:0 file Chromium's fake camera
    plays (in a loop, at the header's frame rate)."""
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{scene.WIDTH} H{scene.HEIGHT} F{FPS}:1 Ip A1:1 C420jpeg\n"
                  .encode())
        for k in frames:
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(scene.frame(k), cv2.COLOR_BGR2YUV_I420).tobytes())


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Chromium whose camera is the scene (granted without asking)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make test`, which installs it")
    video = tmp_path_factory.mktemp("camera") / "scene.y4m"
    write_y4m(video, LOOP)
    fake = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-video-capture={video}"]
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, *fake])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("keyed"), env={"DFINE_API_KEY": KEY}) as running:
        yield running


def open_page(browser: Browser, url: str, width: int = 1100, height: int = 900,
              mobile: bool = False) -> tuple[Page, list[str]]:
    """The page, and the Content-Security-Policy violations it reports."""
    page = browser.new_page(viewport={"width": width, "height": height}, is_mobile=mobile)
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(url + "/")
    return page, violations


def wait_for_answers(page: Page, count: int, timeout_s: float = 90) -> dict[str, Any]:
    """window.dfineLive once ``count`` answers have come (the status line counted them)."""
    return wait_until(lambda: (info := page.evaluate("window.dfineLive"))["answered"] >= count
                      and info, timeout_s, f"{count} answers on the page")


def sessions(server: Server, headers: dict[str, str] | None = None) -> float:
    return metric(server.url, "dfine_client_sessions", headers)


def iou(detection: dict[str, Any], box: scene.Box) -> float:
    return box_iou(tuple(detection["box"].values()), box)


def matches(detections: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """For each of the scene's paths, the detection of its class that overlaps it most (IoU at
    least 0.5), or None; on the looped frame these detections fit best (which frame the camera
    showed is not known to the page, only that it is one of LOOP's)."""
    def best(k: int) -> list[dict[str, Any] | None]:
        found: list[dict[str, Any] | None] = []
        for class_id, box in scene.truth(k):
            same = [d for d in detections if d["class_id"] == class_id and iou(d, box) >= 0.5]
            found.append(max(same, key=lambda d: iou(d, box), default=None))
        return found

    def fit(k: int) -> float:
        return sum((iou(d, box) for d, (_, box) in zip(best(k), scene.truth(k))
                    if d is not None), 0.0)
    return best(max(range(FORWARD), key=fit))


def test_camera_draws_tracked_detections_live_and_stop_ends_the_session(
        server: Server, camera: Browser) -> None:
    page, violations = open_page(camera, server.url)
    page.get_by_role("button", name="Camera").click()
    info = wait_for_answers(page, 30)
    assert wait_until(lambda: sessions(server) == 1, 30, "one client session")

    # The status line counts: answers at some rate, and what the service dropped.
    stats = page.locator("#liveStats")
    assert STATS.fullmatch(stats.inner_text()), stats.inner_text()
    assert int(stats.get_attribute("data-answered") or 0) >= 30
    assert info["fpsAnswered"] > 0 and info["rttMs"] > 0
    assert info["sent"] - info["last"]["frame"] <= 2  # one frame detected, one waiting

    # The answers after the tracker's first frames: the scene's three shapes, each found as a
    # tracked detection of its class over its box (the model misses a shape on a rare frame);
    # each shape keeps its id (one switch at most), and no two share one.
    answers = [a for a in info["recent"] if a["frame"] > 5]
    assert len(answers) >= 20
    ids: list[list[int]] = [[], [], []]
    for answer in answers:
        assert (answer["width"], answer["height"]) == (scene.WIDTH, scene.HEIGHT)
        tracked = [d for d in answer["detections"] if d["track_id"] is not None]
        found = matches(tracked)
        for path, match in enumerate(found):
            if match is not None:
                ids[path].append(match["track_id"])
        seen = [match["track_id"] for match in found if match is not None]
        assert len(set(seen)) == len(seen), answer
    for path_ids in ids:
        assert len(path_ids) >= 0.9 * len(answers), ids
        switches = sum(a != b for a, b in pairwise(path_ids))
        assert switches <= 1, ids

    # What is drawn: the last answer's boxes above the slider's 0.5, labelled with their track
    # ids, scaled from the frame's pixels to the video's size on the page.
    shown = page.evaluate("""() => ({  // at one moment: answers keep coming
        drawn: window.dfineLive.drawn, width: window.dfineLive.last.width,
        video: document.querySelector("#video").getBoundingClientRect().toJSON(),
        overlay: document.querySelector("#overlay").getBoundingClientRect().toJSON(),
        listed: [...document.querySelectorAll("#detections li")].map((li) => li.innerText),
    })""")
    drawn = shown["drawn"]
    assert drawn and all(d["score"] >= 0.5 and d["track_id"] is not None for d in drawn)
    video = shown["video"]
    assert shown["overlay"] == video and video["width"] != shown["width"]  # over it, resized
    scale = video["width"] / shown["width"]
    for d in drawn:
        for corner in ("x1", "y1", "x2", "y2"):
            assert d["shown"][corner] == pytest.approx(d["box"][corner] * scale, abs=0.5)
    assert [t.split()[:2] for t in shown["listed"]] == [
        [f"#{d['track_id']}", d["label"]] for d in drawn]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-camera.png"), full_page=True)

    # A frame the service cannot decode (sent as the page sends, numbered with the others):
    # its error is shown, and the session goes on.
    page.evaluate("() => { live.socket.send(new Blob(['not an image'])); live.sent += 1; }")
    wait_until(lambda: "invalid_image" in page.inner_text("#status"), 30, "the frame's error")
    assert page.evaluate("document.querySelector('#status').className") == "error"
    wait_until(lambda: page.inner_text("#status").startswith("Camera on"), 30, "answers again")

    # Stop releases the camera and closes the session on the service.
    page.get_by_role("button", name="Stop").click()
    assert wait_until(lambda: sessions(server) == 0, 30, "no client session")
    assert page.evaluate("document.querySelector('#video').srcObject") is None
    assert not page.is_visible("#live") and page.is_visible("#camera")
    assert page.inner_text("#status") == "Camera stopped."
    assert page.evaluate("window.dfineLive.running") is False
    assert violations == []
    page.close()


def test_camera_with_an_api_key_asks_for_it_then_works(keyed_server: Server,
                                                       camera: Browser) -> None:
    headers = {"X-API-Key": KEY}
    page, violations = open_page(camera, keyed_server.url, 375, 812, mobile=True)  # a phone
    page.get_by_role("button", name="Camera").click()  # no key yet: refused, and told why
    wait_until(lambda: page.evaluate("document.querySelector('#status').className")
               == "error", 30, "an error on the page")
    message = page.inner_text("#status")
    assert "API key" in message, message
    assert page.is_visible("#camera") and not page.is_visible("#live")  # the camera let go
    assert sessions(keyed_server, headers) == 0

    page.fill("#key", KEY)
    page.get_by_role("button", name="Camera").click()
    wait_for_answers(page, 5)
    assert page.evaluate("window.dfineLive.last.detections.length") > 0
    assert sessions(keyed_server, headers) == 1
    assert page.evaluate("document.documentElement.scrollWidth") <= 376  # no sideways scroll
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-camera-phone.png"), full_page=True)
    page.get_by_role("button", name="Stop").click()
    assert wait_until(lambda: sessions(keyed_server, headers) == 0, 30, "no client session")
    assert violations == []
    page.close()
