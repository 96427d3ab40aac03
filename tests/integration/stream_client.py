"""What the stream tests use to read a service's streams as a user does: its events over SSE,
its status, and the scene's truth to compare with."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from tests.helpers import box_iou, wait_until
from tests.video import scene

Event = tuple[str, dict[str, Any]]


def create(url: str, body: dict[str, Any], headers: dict[str, str] | None = None
           ) -> dict[str, Any]:
    answer = httpx.post(f"{url}/streams", json=body, headers=headers, timeout=30)
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"] == f"/streams/{answer.json()['id']}"
    return dict(answer.json())


def status(url: str, stream_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/streams/{stream_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def wait_for_state(url: str, stream_id: str, states: set[str], timeout_s: float
                   ) -> dict[str, Any]:
    return wait_until(lambda: (s := status(url, stream_id))["state"] in states and s,
                      timeout_s, f"stream {stream_id} to be {states}")


def events(url: str, stream_id: str, timeout_s: float, after: int | None = -1,
           frames: int | None = None) -> list[Event]:
    """The stream's events until its end (or ``frames`` frame events), read as SSE."""
    got: list[Event] = []
    deadline = time.monotonic() + timeout_s
    params = {} if after is None else {"after": after}
    with httpx.stream("GET", f"{url}/streams/{stream_id}/events", params=params,
                      timeout=httpx.Timeout(timeout_s, connect=10)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                got.append((kind, json.loads(line[len("data: "):])))
                if kind == "end":
                    return got
                if frames is not None and sum(k == "frame" for k, _ in got) >= frames:
                    return got
            if time.monotonic() > deadline:
                raise AssertionError(f"no end within {timeout_s} s; got {len(got)} events")
    return got


def frame_events(got: list[Event]) -> list[dict[str, Any]]:
    return [body for kind, body in got if kind == "frame"]


def track_ids_by_path(frames: list[dict[str, Any]], source_frame: Any = None
                      ) -> dict[int, set[int]]:
    """For each path of the scene (its index in ``scene.truth``), the track ids given to the
    detections that match it (same class, IoU >= 0.5)."""
    ids: dict[int, set[int]] = {}
    for body in frames:
        k = body["frame"] if source_frame is None else source_frame(body)
        for path, (class_id, box) in enumerate(scene.truth(k)):
            for det in body["detections"]:
                b = det["box"]
                if (det["class_id"] == class_id and det["track_id"] is not None
                        and box_iou((b["x1"], b["y1"], b["x2"], b["y2"]), box) >= 0.5):
                    ids.setdefault(path, set()).add(det["track_id"])
    return ids
