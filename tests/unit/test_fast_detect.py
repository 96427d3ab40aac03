"""The /detect fast path takes only queries whose values are in plain forms; anything else
goes to FastAPI, which validates it (tests/integration/test_errors.py checks those answers)."""

from __future__ import annotations

import pytest

from app.api.fast_detect import plain_query


def test_plain_values_are_taken() -> None:
    assert plain_query(b"") == {}
    assert plain_query(b"score_threshold=0.25&max_detections=10&clip=false&dedupe_iou=0.5"
                       b"&orientation=stored&classes=person,2&model=m&version=3&other=x") == {
        "score_threshold": 0.25, "max_detections": 10, "clip": False, "dedupe_iou": 0.5,
        "orientation": "stored", "classes": "person,2"}
    assert plain_query(b"score_threshold=0.1&score_threshold=0.9") == {"score_threshold": 0.9}
    assert plain_query(b"tile=none&score_threshold=0.3") == {"tiling": None,
                                                             "score_threshold": 0.3}


@pytest.mark.parametrize("query", [
    b"score_threshold=1.5", b"score_threshold=-0.1", b"score_threshold=nan",
    b"score_threshold=", b"score_threshold=1e-3", b"max_detections=0",
    b"max_detections=301", b"max_detections=07", b"clip=yes", b"orientation=EXIF",
    b"version=0", b"version=abc", b"version=", b"model=" + b"m" * 129, b"classes=" + b"a" * 4097,
    b"tile=640", b"tile=auto", b"tile=None", b"tile=none&tile_overlap=0.3", b"tile_merge=nms",
])
def test_anything_else_goes_to_fastapi(query: bytes) -> None:
    assert plain_query(query) is None
