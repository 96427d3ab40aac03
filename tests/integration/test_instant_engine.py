"""The instant engine of benchmarks (INSTANT_ENGINE): the whole front end serves, the model
is never run, and /model says so."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers import encode, render_scene, run_server


def test_the_instant_engine_answers_every_route_with_nothing_found(tmp_path: Path) -> None:
    with run_server(tmp_path, "--instant-engine") as server:
        image = encode(render_scene(1)[0])
        answer = httpx.post(f"{server.url}/detect", files={"image": ("a.jpg", image)},
                            params={"score_threshold": 0.01}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["detections"] == [] and body["image"]["width"] > 0
        engine = httpx.get(f"{server.url}/model", timeout=5).json()["engine"]
        assert engine["instant"] is True and engine["providers_running"] == ["instant"]
        assert httpx.post(f"{server.url}/detect", files={"image": ("a.jpg", b"nope")},
                          timeout=10).status_code == 400  # decoding still checks the upload
