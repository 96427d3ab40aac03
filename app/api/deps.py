"""Typed dependencies of the routes.

All are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in a worker
thread, and those hops cost more CPU per /detect request than everything else in this module.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from app.config import Settings
from app.errors import InvalidRequest, NotReady, Unauthorized
from app.metrics import Metrics
from app.orientation import OrientationMode
from app.service import Detector, DetectParams


@dataclass
class AppState:
    """What the routes need; built by ``create_app``, filled in by the lifespan."""

    settings: Settings
    metrics: Metrics
    detector: Detector | None = None
    draining: bool = False
    failure: str | None = None  # why the model could not be loaded or warmed up

    @property
    def ready(self) -> bool:
        return self.detector is not None and not self.draining and not self.engine_hung

    @property
    def engine_hung(self) -> bool:
        return self.detector is not None and self.detector.batcher.hung_runs > 0


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.dfine
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_detector(request: Request, state: StateDep) -> Detector:
    # A hung engine run does not stop the others: requests are still served (readiness tells
    # the load balancer to go elsewhere meanwhile). While draining, a request the admission
    # gate let in before the signal is finished; any other is refused.
    admitted = request.scope.get("state", {}).get("admitted", False)
    if state.detector is None or (state.draining and not admitted):
        raise NotReady()
    return state.detector


DetectorDep = Annotated[Detector, Depends(get_detector)]


async def require_api_key(request: Request, state: StateDep) -> None:
    """With DFINE_API_KEY set: a Bearer token or X-API-Key header, compared in constant time."""
    expected = state.settings.api_key
    if not expected or request.url.path in state.settings.open_path_set:
        return
    given = request.headers.get("x-api-key") or None  # an empty header is no key
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized()


# Without class names (a raw head of unknown width), ids are only checked for sanity.
MAX_CLASS_ID = 100_000


def _class_ids(text: str | None, names: list[str] | None) -> frozenset[int] | None:
    """``classes``: absent or empty keeps every class; otherwise each comma-separated item must
    be a known class name (any case) or a class id (ASCII digits, within the model's classes):
    anything else is a 422, so that a typo never silently filters everything out."""
    if text is None or not text.strip():
        return None
    index = {name.lower(): i for i, name in enumerate(names or [])}
    count = len(names) if names else MAX_CLASS_ID
    ids = set()
    for token in (t.strip() for t in text.split(",")):
        if token.lower() in index:
            ids.add(index[token.lower()])
        elif token.isascii() and token.isdigit() and len(token) <= 6 and int(token) < count:
            ids.add(int(token))
        elif not token:
            raise InvalidRequest("classes: an empty item (a stray comma)")
        else:
            known = f"; known: {', '.join(names[:20])} or ids 0..{count - 1}" if names else ""
            raise InvalidRequest(f"classes: unknown class {token[:64]!r}{known}")
    return frozenset(ids)


async def detect_params(
    state: StateDep,
    score_threshold: Annotated[float | None, Query(
        ge=0, le=1, description="drop detections below this score (default: setting)")] = None,
    max_detections: Annotated[int | None, Query(
        ge=1, le=300, description="keep at most this many detections per image")] = None,
    classes: Annotated[str | None, Query(
        max_length=4096, description="comma list of class names or ids to keep")] = None,
    clip: Annotated[bool | None, Query(
        description="clip boxes to the image (default: setting CLIP_BOXES, true); false "
                    "gives the official pipeline's boxes")] = None,
    dedupe_iou: Annotated[float | None, Query(
        ge=0, le=1, description="drop a detection when a higher-scored one of the same class "
                                "overlaps it by this IoU; 0: off (default: setting)")] = None,
    orientation: Annotated[OrientationMode | None, Query(
        description="exif: turn the photo as its EXIF orientation says, as viewers show it; "
                    "stored: pixels as stored, as the official pipeline (default: setting "
                    "ORIENTATION, exif)")] = None,
) -> DetectParams:
    settings = state.settings
    names = state.detector.engine.info.labels if state.detector else None
    return DetectParams(
        score_threshold=settings.score_threshold if score_threshold is None else score_threshold,
        max_detections=settings.max_detections if max_detections is None else max_detections,
        class_ids=_class_ids(classes, names),
        clip=settings.clip_boxes if clip is None else clip,
        dedupe_iou=settings.dedupe_iou if dedupe_iou is None else dedupe_iou,
        orientation=orientation or settings.orientation,
    )


ParamsDep = Annotated[DetectParams, Depends(detect_params)]
