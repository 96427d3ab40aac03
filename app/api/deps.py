"""Typed dependencies of the routes.

All are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in a worker
thread, and those hops cost more CPU per /detect request than everything else in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal, cast

from fastapi import Depends, Query, Request

from app.api.keys import authorize
from app.api.shm import Regions
from app.config import Settings
from app.errors import InvalidRequest, NotReady
from app.metrics import Metrics
from app.model_repository import MAX_VERSION
from app.orientation import OrientationMode
from app.routing import Routing
from app.service import Detector, DetectParams
from app.tiling import MatchMetric, MergeMethod, Tiling, parse_tile
from app.tracing import Tracing

if TYPE_CHECKING:
    from app.streams.manager import StreamManager


@dataclass
class AppState:
    """What the routes need; built by ``create_app``, the registry filled by the lifespan."""

    settings: Settings
    metrics: Metrics
    registry: Routing
    draining: bool = False
    streams: StreamManager | None = None  # server-side streams (app.streams)
    client_sessions: int = 0  # clients sending frames over WebSocket, now
    tracing: Tracing = field(default_factory=Tracing)  # traces (app.tracing): off unless set
    shm: Regions | None = None  # system shared memory's regions (app.api.shm)

    @property
    def ready(self) -> bool:
        return self.registry.ready and not self.draining

    @property
    def engine_hung(self) -> bool:
        return self.registry.hung

    @property
    def failure(self) -> str | None:
        """Why the start could not serve every model."""
        return self.registry.failure


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.dfine
    return state


StateDep = Annotated[AppState, Depends(get_state)]
MAX_NAME_CHARS = 128
MAX_DETECTIONS = 300  # the official export's top-k


def bind(request: Request, detector: Detector) -> Detector:
    """Note which model version answers (the metrics' and the access log's labels)."""
    scope_state = request.scope.setdefault("state", {})
    scope_state["model"], scope_state["version"] = detector.name, str(detector.version)
    return detector


def admitted(request: Request, state: AppState, name: str | None, version: int | None
             ) -> Detector:
    """The version the admission gate routed this request to and holds its places on: it
    finishes there even if a newer version takes over meanwhile. A request the gate did not
    admit gets the reason (unknown model 404, loading 503, no model named 422), or 503 if a
    version turned ready between the gate and here."""
    detector: Detector | None = request.scope.get("state", {}).get("detector")
    if detector is not None:
        return bind(request, detector)
    if state.draining:
        raise NotReady()
    state.registry.resolve(name, version)
    raise NotReady()


async def get_detector(
    request: Request, state: StateDep,
    model: Annotated[str | None, Query(
        max_length=MAX_NAME_CHARS,
        description="the model to run (default: DEFAULT_MODEL, or the only one)")] = None,
    version: Annotated[int | None, Query(
        ge=1, le=MAX_VERSION, description="its version (default: the newest loaded)")] = None,
) -> Detector:
    return admitted(request, state, model or None, version)


DetectorDep = Annotated[Detector, Depends(get_detector)]


async def get_model(
    request: Request, state: StateDep,
    model: Annotated[str | None, Query(
        max_length=MAX_NAME_CHARS, description="which model (default: the default one)")
    ] = None,
    version: Annotated[int | None, Query(
        ge=1, le=MAX_VERSION, description="its version (default: the newest loaded)")] = None,
) -> Detector:
    """A loaded model version, for what reads it without running it (/model)."""
    return bind(request, state.registry.resolve(model or None, version))


ModelDep = Annotated[Detector, Depends(get_model)]


async def require_api_key(request: Request, state: StateDep) -> None:
    """With DFINE_API_KEY set: a Bearer token or X-API-Key header, compared in constant time."""
    if request.url.path not in state.settings.open_path_set:
        authorize(state.settings, request.headers)


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
    detector: DetectorDep,
    score_threshold: Annotated[float | None, Query(
        ge=0, le=1, description="drop detections below this score (default: setting)")] = None,
    max_detections: Annotated[int | None, Query(
        ge=1, le=MAX_DETECTIONS, description="keep at most this many detections per image")] = None,
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
    tile: Annotated[str | None, Query(
        max_length=16, description="tiled inference for small objects: a tile size in the "
        "original image's pixels, auto (tiles only an image much larger than the model's "
        "input), or none (default: setting TILE, none)")] = None,
    tile_overlap: Annotated[float | None, Query(
        ge=0, le=0.9, description="overlap of neighbouring tiles, a fraction of the tile "
        "(default: setting, 0.2)")] = None,
    tile_merge: Annotated[MergeMethod | None, Query(
        description="merging of the tiles' detections: nms, greedy_nmm (a box cut by a tile "
        "border grows back to the whole object), none (default: setting, nms)")] = None,
    tile_merge_threshold: Annotated[float | None, Query(
        gt=0, le=1, description="overlap at which two detections merge (default: setting, "
        "0.5)")] = None,
    tile_merge_metric: Annotated[MatchMetric | None, Query(
        description="ios (intersection over the smaller box) or iou (default: setting, "
        "ios)")] = None,
    tile_full_image: Annotated[bool | None, Query(
        description="run the whole image too, and merge its detections with the tiles' "
        "(default: setting, true)")] = None,
    tile_class_aware: Annotated[bool | None, Query(
        description="merge only detections of one class (default: true)")] = None,
) -> DetectParams:
    tiling = tiling_for(detector, tile, tile_overlap, tile_merge, tile_merge_threshold,
                        tile_merge_metric, tile_full_image, tile_class_aware)
    return params_for(detector, score_threshold, max_detections, classes, clip, dedupe_iou,
                      orientation, tiling)


def tiling_for(detector: Detector, tile: str | int | None = None,
               overlap: float | None = None, merge: str | None = None,
               merge_threshold: float | None = None, metric: str | None = None,
               full_image: bool | None = None, class_aware: bool | None = None
               ) -> Tiling | None:
    """A request's tiling: what it asked for over the model's defaults (settings.json, then
    the service's TILE settings); None: untiled. InvalidRequest for a value out of range."""
    base = detector.default_tiling
    try:
        size = parse_tile(str(tile)) if tile is not None else (
            base.tile if base is not None else None)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if size is None:
        if tile is None and any(v is not None for v in (overlap, merge, merge_threshold, metric,
                                                         full_image, class_aware)):
            raise InvalidRequest("the tile_* parameters need tile (auto or a size): this model "
                                 "does not tile by default")
        return None
    settings = detector.settings
    try:
        return Tiling(
            tile=size,
            overlap=settings.tile_overlap if overlap is None else overlap,
            merge=cast(MergeMethod, settings.tile_merge if merge is None else merge),
            merge_threshold=(settings.tile_merge_threshold if merge_threshold is None
                             else merge_threshold),
            merge_metric=cast(MatchMetric, settings.tile_merge_metric if metric is None
                              else metric),
            full_image=settings.tile_full_image if full_image is None else full_image,
            class_aware=True if class_aware is None else class_aware)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(str(exc)) from None


def params_for(detector: Detector, score_threshold: float | None = None,
               max_detections: int | None = None, classes: str | None = None,
               clip: bool | None = None, dedupe_iou: float | None = None,
               orientation: OrientationMode | None = None,
               tiling: Tiling | Literal["default"] | None = "default") -> DetectParams:
    """A detection's parameters: the query's (validated already), else the model's own
    settings (its settings.json over the service's); ``tiling`` "default": the model's."""
    settings = detector.settings
    return DetectParams(
        score_threshold=settings.score_threshold if score_threshold is None else score_threshold,
        max_detections=settings.max_detections if max_detections is None else max_detections,
        class_ids=_class_ids(classes, detector.engine.info.labels),
        clip=settings.clip_boxes if clip is None else clip,
        dedupe_iou=settings.dedupe_iou if dedupe_iou is None else dedupe_iou,
        orientation=orientation or settings.orientation,
        tiling=detector.default_tiling if tiling == "default" else tiling,
    )


ParamsDep = Annotated[DetectParams, Depends(detect_params)]
