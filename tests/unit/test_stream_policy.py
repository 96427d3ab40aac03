"""Which sources a stream may read (app.streams.policy): nothing outside STREAM_SOURCES and
VIDEO_DIR, and no trick of a URL's spelling gets past it."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from app.errors import InvalidRequest
from app.streams.policy import SourcePolicy, SourceRefused


def policy(sources: str = "", video_dir: Path | None = None) -> SourcePolicy:
    return SourcePolicy.of(Settings(stream_sources=sources, video_dir=video_dir))


def test_nothing_is_allowed_by_default() -> None:
    with pytest.raises(SourceRefused):
        policy().check("rtsp://127.0.0.1/cam")
    with pytest.raises(SourceRefused, match="VIDEO_DIR"):
        policy().check("clip.mp4")


@pytest.mark.parametrize("url", [
    "rtsp://cam1.lan/sub", "rtsp://CAM1.lan:554/sub/x", "rtsp://user:pw@cam1.lan/sub",
    "http://10.1.2.3:8080/video/a.mjpg",
])
def test_a_url_under_an_allowed_prefix_is_allowed(url: str) -> None:
    allowed = policy("rtsp://cam1.lan/sub, http://10.1.2.3:8080/video/")
    source = allowed.check(url)
    assert source.target == url
    assert "pw" not in source.shown and "user" not in source.shown


@pytest.mark.parametrize("url", [
    "rtsp://cam1.lan.evil.com/sub",  # the host is a longer name
    "rtsp://cam1.lan/subway",  # the path only starts with the prefix's letters
    "rtsp://cam1.lan:8554/sub",  # another port
    "rtsps://cam1.lan/sub",  # another scheme
    "http://10.1.2.3:8080/videos",
    "http://10.1.2.3/video/a",  # port 80, not 8080
    "http://cam1.lan@10.9.9.9/sub",  # the user name is not the host
    "rtsp://evil.com#@cam1.lan/sub",
])
def test_a_url_that_only_looks_allowed_is_refused(url: str) -> None:
    allowed = policy("rtsp://cam1.lan/sub, http://10.1.2.3:8080/video/")
    with pytest.raises(SourceRefused):
        allowed.check(url)


def test_a_network_allows_its_addresses_and_pins_the_one_checked() -> None:
    allowed = policy("127.0.0.0/8")
    source = allowed.check("http://localhost:9000/a.mjpg?token=secret")
    assert source.target == "http://127.0.0.1:9000/a.mjpg?token=secret"
    assert source.host == "localhost"
    assert "secret" not in source.shown
    with pytest.raises(SourceRefused):
        allowed.check("http://10.0.0.1/a.mjpg")
    with pytest.raises(SourceRefused):  # a name that does not resolve is not in the network
        allowed.check("rtsp://no-such-host.invalid/a")


@pytest.mark.parametrize("text", ["ftp://cam1.lan/x", "file:///etc/passwd", "rtsp:///x",
                                  "http://cam1.lan:99999/x", "gopher://x"])
def test_what_is_not_a_source_is_a_422(text: str) -> None:
    with pytest.raises(InvalidRequest):
        policy("rtsp://cam1.lan/").check(text)


def test_files_only_under_the_video_dir(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    (videos / "sub" / "a.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    (videos / "link.mp4").symlink_to(tmp_path / "secret.mp4")
    allowed = policy(video_dir=videos)
    assert allowed.check("sub/a.mp4").target == str(videos / "sub" / "a.mp4")
    for outside in ("../secret.mp4", str(tmp_path / "secret.mp4"), "link.mp4"):
        with pytest.raises(SourceRefused):
            allowed.check(outside)
    with pytest.raises(InvalidRequest):
        allowed.check("missing.mp4")
    with pytest.raises(InvalidRequest):
        allowed.check("sub")  # a directory


def test_a_bad_allowed_list_stops_the_start() -> None:
    with pytest.raises(ValueError, match="neither a URL prefix"):
        policy("cam1.lan")


@pytest.mark.parametrize("url", ["http://cam.lan/cam1/../admin/reboot",
                                 "http://cam.lan/cam1/%2e%2e/admin", "rtsp://cam.lan/cam1/./x"])
def test_dot_segments_cannot_climb_out_of_a_prefix(url: str) -> None:
    with pytest.raises(InvalidRequest, match="segments"):
        policy("http://cam.lan/cam1/, rtsp://cam.lan/cam1/").check(url)


def test_https_allowed_by_network_is_pinned_to_the_checked_address() -> None:
    source = policy("127.0.0.0/8").check("https://localhost:8443/a.mjpg")
    assert source.target == "https://127.0.0.1:8443/a.mjpg" and source.host == "localhost"
