"""The detector: decode in a thread pool, batch through the engine, postprocess per request.

It joins the engine, the batcher and the pure processing functions, and knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from app.batching import DynamicBatcher
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import InvalidImage, NotReady, Overloaded, TooManyTiles
from app.exact import bgr, open_rgb, prepare_exact
from app.imaging import PreparedImage, UInt8Image, check_header, decode, prepare
from app.metrics import VersionMetrics
from app.orientation import OrientationMode, oriented_size
from app.postprocess import Detection, original_boxes, select
from app.render import ImageFormat, draw
from app.render import encode as encode_image
from app.threads import name_os_thread
from app.tiling import Tile, Tiling, cut_by_border, merge, shift, tile_count, tile_grid
from app.tracing import current_trace
from app.trim import IdleTrimmer
from app.workers import WorkerPool

MAX_ROOM_WAITERS = 256
_SERIALS = itertools.count(1)
T = TypeVar("T")


@dataclass(frozen=True)
class DetectParams:
    score_threshold: float
    max_detections: int
    class_ids: frozenset[int] | None = None
    clip: bool = True
    dedupe_iou: float = 0.0  # 0: off
    orientation: OrientationMode = "exif"
    tiling: Tiling | None = None  # None: the image runs whole, as one engine image


@dataclass
class _Row:
    """One image's share of an engine run (official layout), with the run's timestamps."""

    labels: npt.NDArray[np.int64]
    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]
    run_started: float
    run_finished: float
    batch_size: int


@dataclass
class Official:
    """One image's detections as the official export answers them: labels (k,), boxes (k, 4)
    xyxy in original pixels, scores (k,), sorted by score."""

    labels: npt.NDArray[np.int64]
    boxes: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float32]


@dataclass
class DetectResult:
    width: int
    height: int
    detections: list[Detection]
    timing_ms: dict[str, float]
    batch_size: int  # images in the engine run this image went through (tiled: the largest)
    tiling: TilingReport | None = None  # a request that asked for tiling: what was done


@dataclass(frozen=True)
class TilePlan:
    """How one image is cut: ``windows`` (empty: not tiled) in the upright image's pixels,
    and whether the whole image runs too."""

    width: int
    height: int
    tile: int | None
    overlap: float
    windows: list[Tile]
    full_image: bool

    @property
    def images(self) -> int:
        """Engine images the request becomes."""
        return len(self.windows) + self.full_image if self.windows else 1

    @property
    def sources(self) -> list[Tile]:
        """Each engine image's window of the original: the tiles, then the whole image."""
        whole = Tile(0, 0, self.width, self.height)
        return [*self.windows, whole] if self.full_image or not self.windows else self.windows


@dataclass(frozen=True)
class TilingReport:
    """What a tiled request became: its plan, and the engine runs its images took."""

    plan: TilePlan
    engine_runs: int

    def json(self) -> dict[str, Any]:
        plan = self.plan
        return {"tile": plan.tile, "overlap": plan.overlap,
                "full_image": plan.full_image and bool(plan.windows),
                "tiles": [{"x": t.x, "y": t.y, "width": t.width, "height": t.height}
                          for t in plan.windows],
                "engine_images": plan.images, "engine_runs": self.engine_runs}


def stream_room(settings: Settings) -> int:
    """Images of streams and clients' frames that may be in the batcher at once, beside the
    admitted requests: each stream's STREAM_FRAMES_IN_FLIGHT, each client's one."""
    return (settings.max_streams * settings.stream_frames_in_flight
            + settings.max_client_streams * max(1, settings.frontends))  # per front end


class Place(Protocol):
    """Where one model-ready image is written before its run: ``view``, a spare array (one
    process) or a shared-memory slot of a front end (``shared``: app.frontend). Given back
    with ``release`` (a slot not before its run is over)."""

    view: npt.NDArray[np.float32] | None
    shared: bool

    def release(self) -> None: ...


class _Spare:
    """A model-ready tensor from the version's spares (one process), given back when its
    request ends: under load, requests write into memory already faulted in instead of a
    fresh array of pages each (glibc gives a freed array's pages back, and a 640×640 tensor
    is always a mapping of its own)."""

    shared = False  # not seen by another process: a client's tensor needs no copy into it

    def __init__(self, spares: list[npt.NDArray[np.float32]], shape: tuple[int, ...]) -> None:
        self._spares = spares
        self.view: npt.NDArray[np.float32] | None = (
            spares.pop() if spares else np.empty(shape, np.float32))

    def release(self) -> None:
        if self.view is not None:
            self._spares.append(self.view)
            self.view = None


class Runs(Protocol):
    """Where a version's images run: its own batcher and engine (one process), or the engine
    process (FRONTENDS > 1: app.frontend.RemoteRuns)."""

    @property
    def hung_runs(self) -> int: ...

    def start(self) -> None: ...

    def place(self) -> Place: ...

    async def submit(self, payload: PreparedImage, timeout_s: float) -> _Row: ...

    async def submit_many(self, payloads: list[PreparedImage], timeout_s: float
                          ) -> list[_Row]: ...

    async def drain(self, timeout_s: float) -> bool: ...

    async def stop(self) -> None: ...


class _LocalRuns:
    """A version's own batcher: images in spare arrays, run in this process."""

    def __init__(self, batcher: DynamicBatcher[PreparedImage, _Row],
                 shape: tuple[int, ...]) -> None:
        self.batcher, self.shape = batcher, shape
        self._spares: list[npt.NDArray[np.float32]] = []  # at most one per admitted image

    def idle(self) -> None:
        """No request is in flight: the spares go (their memory back to the system)."""
        self._spares.clear()

    @property
    def hung_runs(self) -> int:
        return self.batcher.hung_runs

    def start(self) -> None:
        self.batcher.start()

    def place(self) -> Place:
        return _Spare(self._spares, self.shape)

    async def submit(self, payload: PreparedImage, timeout_s: float) -> _Row:
        return await self.batcher.submit(payload, timeout_s)

    async def submit_many(self, payloads: list[PreparedImage], timeout_s: float
                          ) -> list[_Row]:
        return await self.batcher.submit_many(payloads, timeout_s)

    async def drain(self, timeout_s: float) -> bool:
        return await self.batcher.drain(timeout_s)

    async def stop(self) -> None:
        await self.batcher.stop()


class Detector:
    """One model version served: its engine, its batcher, its own admission places."""

    def __init__(self, engine: OnnxEngine, settings: Settings, metrics: VersionMetrics,
                 version: int = 1, runs: Runs | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.name = engine.info.name
        self.version = version
        self.max_batch_size = engine.parallel.max_batch_size
        self.decode_workers = engine.parallel.decode_workers
        self._decode_pool = WorkerPool(self.decode_workers, "decode")
        # Requests admitted at once (each holding its upload, then its decoded image): enough
        # to keep the queue and every engine instance full, and no more. This is what bounds
        # memory: see docs/limits-and-reliability.md, "Memory".
        # With FRONTENDS=N, each front end admits as many (a share would leave one front end
        # refusing while another has room, as connections are not spread evenly).
        self.max_admitted = (settings.max_queue + self.decode_workers
                             + engine.parallel.instances * self.max_batch_size)
        # The batcher's own bound never refuses an admitted request (every front end's, in the
        # engine process): refusing after the upload was read and decoded would waste what
        # admission exists to save.
        self.batcher: DynamicBatcher[PreparedImage, _Row] | None = None
        self._local: _LocalRuns | None = None
        if runs is None:
            self.batcher = DynamicBatcher(
                self._run_batch, max_batch_size=self.max_batch_size,
                max_delay_s=settings.max_delay_ms / 1000,
                max_queue=self.max_admitted * max(1, settings.frontends)
                + stream_room(settings),
                batch_sizes=engine.buckets,
                instances=engine.parallel.instances, run_timeout_s=settings.engine_timeout_s,
                observer=metrics)
            info = engine.info
            self._local = runs = _LocalRuns(self.batcher, (3, info.input_height,
                                                           info.input_width))
        self.runs: Runs = runs
        self._admitted = 0
        # In the engine process: the front ends' slot pools bound to this version. Their
        # admitted requests may still send runs here, so a drain waits until they let go.
        self.serial = next(_SERIALS)  # tells a version's detectors apart (a rewritten file)
        self._pins = 0
        self._trimmer = IdleTrimmer()
        self._room_waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self.accepting = True
        # Renders decode the full image again, draw and encode it: their own threads, so that
        # they never hold up the decoding of /detect requests, and a bound on those in flight
        # (held until the response is sent: app.api.routes).
        self._render_pool = ThreadPoolExecutor(
            settings.max_renders, thread_name_prefix="render", initializer=name_os_thread)
        self._renders = 0

    @property
    def tensor_bytes(self) -> int:
        """One model-ready image."""
        return 3 * self.engine.info.input_width * self.engine.info.input_height * 4

    @property
    def memory_bound_bytes(self) -> int:
        """The most that this version's requests can hold at once, runtime and model aside:
        every admitted request's upload, a full decode (and its resized copy) in each decode
        worker, a model-ready tensor for every admitted image, and each render's decoded,
        drawn and encoded image. A decode worker also holds a copy of its upload (a /v2 image
        is a view into its body until then). The slow uploads that gave their place back are
        the service's, counted once (``app.registry``)."""
        info, settings = self.engine.info, self.settings
        tensor = 3 * info.input_width * info.input_height * 4
        decoding = settings.max_pixels * 3 + info.input_width * info.input_height * 3
        return (self.max_admitted * (settings.max_upload_bytes + tensor)
                + self.decode_workers * (settings.max_upload_bytes + decoding)
                + settings.max_renders * 3 * settings.max_pixels * 3)

    def start(self) -> None:
        self.runs.start()

    def warm_up(self) -> None:
        self.engine.warm_up()
        if self.batcher is not None:
            self.batcher.use_costs(self.engine.bucket_costs)

    async def acquire(self, images: int, wait_s: float) -> None:
        """Hold places for ``images`` images for one request, or raise Overloaded (NotReady when
        draining). Release them with ``release``.

        When full, a request may wait up to ``wait_s`` (without CPU) for its places, handed
        over in arrival order by ``release`` (the first in line takes its places before any
        later one, however many it needs); at most MAX_ROOM_WAITERS wait, each holding only
        what uvicorn buffered of its body (its flow control stops near 64 KiB). Under
        overload, clients that retry at once otherwise turn refusals into the main load.
        """
        if not self.accepting:
            raise NotReady()
        if self._admitted + images <= self.max_admitted and not self._room_waiters:
            self._admitted += images
            return
        if (wait_s <= 0 or images > self.max_admitted
                or len(self._room_waiters) >= MAX_ROOM_WAITERS):
            raise Overloaded(retry_after_s=1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, images)
        self._room_waiters.append(entry)
        try:
            await asyncio.wait_for(waiter, wait_s)  # on success the places are already ours
        except BaseException as exc:  # out of time, or the request cancelled (its client left)
            with contextlib.suppress(ValueError):
                self._room_waiters.remove(entry)
            if waiter.done() and not waiter.cancelled():  # granted just as it gave up
                self.release(images)
            else:
                self._grant()  # a large request that gave up may have held smaller ones back
            if isinstance(exc, TimeoutError):
                raise Overloaded(retry_after_s=1) from None
            raise

    def release(self, images: int) -> None:
        self._admitted -= images
        if self._admitted == 0:
            if self._local is not None:
                self._local.idle()
            self._trimmer.idle()
        self._grant()

    def _grant(self) -> None:
        while self._room_waiters:
            waiter, wanted = self._room_waiters[0]  # the longest waiting first
            if waiter.done():
                self._room_waiters.popleft()
                continue
            if self._admitted + wanted > self.max_admitted:
                return
            self._room_waiters.popleft()
            self._admitted += wanted  # handed over: a newcomer cannot take them first
            waiter.set_result(None)

    @cached_property
    def default_tiling(self) -> Tiling | None:
        """A request's tiling when it asks for none: TILE and its kin (settings.json's first)."""
        return self.settings.tiling

    @cached_property
    def _mean_std(self) -> tuple[tuple[float, float, float] | None,
                                 tuple[float, float, float] | None]:
        """The model's input normalisation, (None, None) where it is none."""
        norm = self.engine.info.normalization
        return (None, None) if norm.is_identity else (norm.mean, norm.std)

    def prepare(self, data: bytes, orientation: OrientationMode | None = None,
                out: npt.NDArray[np.float32] | None = None) -> PreparedImage:
        """Decode and resize one upload (PREPROCESS exact or fast), turned as its EXIF says
        unless ``orientation`` (default: the setting) is ``stored``: the model-ready tensor
        (written into ``out`` when given) and the original size in that frame."""
        orientation = orientation or self.settings.orientation
        started = time.perf_counter()
        info = self.engine.info
        mean, std = self._mean_std
        if self.settings.preprocess == "exact":
            prepared = prepare_exact(open_rgb(data, self.settings.max_pixels, orientation),
                                     info.input_width, info.input_height, info.resize, mean, std,
                                     out)
        else:
            stretch = info.resize == "stretch"
            decoded = decode(data, self.settings.max_pixels,
                             max(info.input_width, info.input_height) if stretch else None,
                             orientation)
            prepared = prepare(decoded.image, info.input_width, info.input_height, info.resize,
                               mean, std, (decoded.width, decoded.height) if stretch else None,
                               out)
        self.metrics.preprocess.observe(time.perf_counter() - started)
        return prepared

    async def _prepare_in_pool(self, data: bytes | memoryview, place: Place,
                               orientation: OrientationMode | None = None) -> PreparedImage:
        """``prepare`` in a decode worker, into ``place``. Cancelled (its client left, or
        another image of its request failed), a decode not started yet never starts; one
        already running is waited for, so that the request's places are held until its memory
        is given back (and its slot is written no more)."""
        return await self._in_pool(self._prepare_bytes, data, orientation, place.view)

    async def _in_pool(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in a decode worker. Cancelled before it starts, it never does;
        once started it is waited for, however often the wait is cancelled (it may be writing
        into a slot that its request gives back when it ends): app.workers."""
        return await self._decode_pool.run(work, *args)

    def _prepare_bytes(self, data: bytes | memoryview, orientation: OrientationMode | None,
                       out: npt.NDArray[np.float32] | None) -> PreparedImage:
        # A view into a request's body (/v2) becomes bytes here, in the worker: one copy per
        # decode worker at a time (counted in the memory bound), not one per queued image.
        return self.prepare(data if isinstance(data, bytes) else bytes(data), orientation, out)

    def _run_batch(self, items: list[PreparedImage]) -> list[_Row]:
        started = time.perf_counter()
        # The images go to the engine as they are: it stacks them straight into a bucket's
        # input buffer (or, without buckets, into one batch array; one image needs no copy).
        images = items[0].pixels[None] if len(items) == 1 else [item.pixels for item in items]
        sizes = np.asarray([item.target_size_wh for item in items], np.int64)
        # All cores for this run only if nothing waits: under load, one core a run is faster.
        assert self.batcher is not None
        out = self.engine.run(images, sizes, may_use_all_cores=self.batcher.queue_depth == 0)
        finished = time.perf_counter()
        return [_Row(out.labels[k], out.boxes[k], out.scores[k], started, finished, len(items))
                for k in range(len(items))]

    @property
    def pixel_format(self) -> Literal["rgb24", "bgr24"]:
        """How ``detect_decoded`` wants a frame's pixels: RGB for PIL (exact), BGR for OpenCV."""
        return "rgb24" if self.settings.preprocess == "exact" else "bgr24"

    def prepare_pixels(self, pixels: Callable[[], UInt8Image],
                       out: npt.NDArray[np.float32] | None = None) -> PreparedImage:
        """``prepare`` for an image decoded already (a video frame): ``pixels()`` gives it, in
        ``pixel_format``; resized and normalised as an upload of the same pixels would be."""
        started = time.perf_counter()
        info = self.engine.info
        mean, std = self._mean_std
        image = pixels()
        if self.settings.preprocess == "exact":
            prepared = prepare_exact(Image.fromarray(image, "RGB"), info.input_width,
                                     info.input_height, info.resize, mean, std, out)
        else:
            prepared = prepare(image, info.input_width, info.input_height, info.resize,
                               mean, std, None, out)
        self.metrics.preprocess.observe(time.perf_counter() - started)
        return prepared

    async def detect_decoded(self, pixels: Callable[[], UInt8Image],
                             params: DetectParams) -> DetectResult:
        """``detect`` for a decoded video frame (app.streams): ``pixels()`` is called in a
        decode worker. A stream's frames take no admission place: each stream bounds its own
        (STREAM_FRAMES_IN_FLIGHT), and the batcher's queue has room for all of them."""
        if not self.accepting:
            raise NotReady()
        return await self._detect(params, self.prepare_pixels, [pixels])

    async def detect_frame(self, data: bytes, params: DetectParams) -> DetectResult:
        """``detect`` for a video frame still encoded (an MJPEG part, a client's frame), which
        takes no admission place either (``detect_decoded``)."""
        if not self.accepting:
            raise NotReady()
        if params.tiling is not None:  # a stream's frames run whole (docs/video.md)
            params = replace(params, tiling=None)
        return await self.detect(data, params)

    async def detect(self, data: bytes, params: DetectParams) -> DetectResult:
        if params.tiling is not None:
            return await self._detect_tiled(data, params, params.tiling)
        work: list[Any] = [data, params.orientation]
        del data
        return await self._detect(params, self._prepare_bytes, work)

    async def _detect(self, params: DetectParams, prepare_in_pool: Callable[..., PreparedImage],
                      work: list[Any]) -> DetectResult:
        """``prepare_in_pool(*work, out)`` in a decode worker, then the engine run and the
        postprocessing. ``work`` is emptied once used: a queued request holds its small tensor
        only, not its upload."""
        started = time.perf_counter()
        trace = current_trace.get()  # a sampled request's (app.tracing): None when off
        place = self.runs.place()
        try:
            prepared = await self._in_pool(prepare_in_pool, *work, place.view)
            work.clear()
            queued = time.perf_counter()
            row = await self.runs.submit(prepared, self.settings.request_timeout_s)
        finally:
            place.release()
        returned = time.perf_counter()
        detections = select(
            row.labels, row.boxes, row.scores, prepared.width, prepared.height,
            self.engine.info.labels, params.score_threshold, params.max_detections,
            params.class_ids, prepared.letterbox, params.clip, params.dedupe_iou)
        finished = time.perf_counter()
        self.metrics.postprocess.observe(finished - returned)
        if trace is not None:
            trace.image(started, queued, (row,), returned, finished)
        timing = {
            "preprocess": queued - started,
            "queue": max(0.0, row.run_started - queued),
            "inference": row.run_finished - row.run_started,
            "total": finished - started,
        }
        return DetectResult(prepared.width, prepared.height, detections,
                            {k: round(v * 1000, 3) for k, v in timing.items()}, row.batch_size)

    async def _detect_tiled(self, data: bytes, params: DetectParams, tiling: Tiling
                            ) -> DetectResult:
        """``detect`` of an image cut into tiles (and run whole too, with ``full_image``):
        the plan from its header, refused (TooManyTiles) before anything is decoded; a place
        for each engine image (the request's own holds one); one decode, each tile resized
        into its place, all of them queued at once (one batch where MAX_BATCH_SIZE allows);
        the tiles' detections shifted to the original's pixels and merged, then selected as
        an untiled image's are. An image ``tiling`` leaves whole runs as ``detect`` runs it."""
        started = time.perf_counter()
        trace = current_trace.get()
        plan = await self._in_pool(self._tile_plan, data, params.orientation, tiling)
        if not plan.windows:
            result = await self._detect(params, self._prepare_bytes, [data, params.orientation])
            return replace(result, tiling=TilingReport(plan, 1))
        extra = plan.images - 1
        await self.acquire(extra, self.settings.admission_wait_ms / 1000)
        try:
            places: list[Place] = []
            try:
                for _ in range(plan.images):
                    places.append(self.runs.place())
                views = [place.view for place in places]
                prepared = await self._in_pool(self._prepare_tiles, data, params.orientation,
                                               plan, views)
                queued = time.perf_counter()
                rows = await self.runs.submit_many(prepared, self.settings.request_timeout_s)
            finally:
                for place in places:
                    place.release()
        finally:
            self.release(extra)
        returned = time.perf_counter()
        # Off the event loop: thousands of boxes (a low threshold) take tens of milliseconds.
        detections = await self._in_pool(self._merged, rows, prepared, plan, tiling, params)
        finished = time.perf_counter()
        self.metrics.postprocess.observe(finished - returned)
        if trace is not None:
            trace.image(started, queued, rows, returned, finished)
        run_started = min(row.run_started for row in rows)
        timing = {
            "preprocess": queued - started,
            "queue": max(0.0, run_started - queued),
            "inference": max(row.run_finished for row in rows) - run_started,
            "total": finished - started,
        }
        report = TilingReport(plan, len({row.run_started for row in rows}))
        return DetectResult(plan.width, plan.height, detections,
                            {k: round(v * 1000, 3) for k, v in timing.items()},
                            max(row.batch_size for row in rows), report)

    def _tile_plan(self, data: bytes, orientation: OrientationMode, tiling: Tiling) -> TilePlan:
        """The tiles of an upload, from its header (decoding nothing): TooManyTiles over
        MAX_TILES, or over what this version admits at once."""
        header = check_header(data, self.settings.max_pixels)
        if header.size is None:
            raise InvalidImage("tiling needs the image's size, and this file's header does not "
                               "give it (re-encode it as JPEG or PNG)")
        turn = header.orientation if orientation == "exif" else 1
        width, height = oriented_size(header.size[0], header.size[1], turn)
        info, max_tiles = self.engine.info, self.settings.max_tiles
        tile = tiling.tile_size(width, height, (info.input_width, info.input_height), max_tiles)
        if tile is None:
            return TilePlan(width, height, None, tiling.overlap, [], tiling.full_image)
        count = tile_count(width, height, tile, tiling.overlap)
        if count > max_tiles:
            raise TooManyTiles(f"tiles of {tile} px at overlap {tiling.overlap} cut this "
                               f"{width}x{height} image into {count} tiles; the limit is "
                               f"{max_tiles} (MAX_TILES): ask for larger tiles, or tile=auto")
        if count + tiling.full_image > self.max_admitted:
            raise TooManyTiles(f"{count + tiling.full_image} engine images for one image; this "
                               f"model admits {self.max_admitted} at once: ask for larger tiles")
        return TilePlan(width, height, tile, tiling.overlap,
                        tile_grid(width, height, tile, tiling.overlap), tiling.full_image)

    def _prepare_tiles(self, data: bytes, orientation: OrientationMode, plan: TilePlan,
                       views: list[npt.NDArray[np.float32] | None]) -> list[PreparedImage]:
        """One decode of the upload (full resolution, upright), then each tile (and the whole
        image) resized into its own place, as ``prepare`` resizes an image: PIL's bilinear
        over the tile's box (exact; its edges read the pixels beyond it, no copy of the tile is
        made) or OpenCV on a view of it (fast)."""
        started = time.perf_counter()
        info = self.engine.info
        mean, std = self._mean_std
        sources, prepared = plan.sources, []
        if self.settings.preprocess == "exact":
            rgb = open_rgb(data, self.settings.max_pixels, orientation)
            if rgb.size != (plan.width, plan.height):
                raise InvalidImage("the image's size differs from what its header says")
            for tile, view in zip(sources, views):
                prepared.append(prepare_exact(
                    rgb, info.input_width, info.input_height, info.resize, mean, std, view,
                    box=(tile.x, tile.y, tile.x + tile.width, tile.y + tile.height)))
        else:
            image = decode(data, self.settings.max_pixels, orientation=orientation).image
            if image.shape[:2] != (plan.height, plan.width):
                raise InvalidImage("the image's size differs from what its header says")
            for tile, view in zip(sources, views):
                prepared.append(prepare(
                    image[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width],
                    info.input_width, info.input_height, info.resize, mean, std, None, view))
        self.metrics.preprocess.observe(time.perf_counter() - started)
        return prepared

    def _merged(self, rows: list[_Row], prepared: list[PreparedImage], plan: TilePlan,
                tiling: Tiling, params: DetectParams) -> list[Detection]:
        """The windows' detections at or above the threshold (and of the classes asked for),
        each window's best ``max_detections`` (the answer keeps no more), in the original's
        pixels, merged (growing only boxes that reach an inner tile border), then selected as
        one image's."""
        boxes, scores, labels, cut = [], [], [], []
        wanted = (None if params.class_ids is None
                  else np.fromiter(params.class_ids, np.int64, len(params.class_ids)))
        margin = max(2.0, 0.01 * (plan.tile or 0))
        for row, image, tile in zip(rows, prepared, plan.sources):
            keep = row.scores >= params.score_threshold
            if wanted is not None:
                keep &= np.isin(row.labels, wanted)
            index = np.flatnonzero(keep)
            index = index[np.argsort(-row.scores[index], kind="stable")[:params.max_detections]]
            shifted = shift(original_boxes(row.boxes[index], image.letterbox), tile)
            boxes.append(shifted)
            scores.append(row.scores[index])
            labels.append(row.labels[index])
            cut.append(cut_by_border(shifted, tile, plan.width, plan.height, margin))
        merged_boxes, merged_scores, merged_labels = merge(
            np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels),
            tiling.merge, tiling.merge_threshold, tiling.merge_metric, tiling.class_aware,
            np.concatenate(cut))
        return select(merged_labels.astype(np.int64), merged_boxes.astype(np.float32),
                      merged_scores.astype(np.float32), plan.width, plan.height,
                      self.engine.info.labels, params.score_threshold, params.max_detections,
                      None, None, params.clip, params.dedupe_iou)

    async def infer_tiled(self, data: bytes | memoryview, params: DetectParams) -> Official:
        """``infer`` of a tiled image (the Open Inference Protocol's ``tile`` parameters):
        ``detect``'s detections in the official layout."""
        result = await self.detect(data if isinstance(data, bytes) else bytes(data), params)
        found = result.detections
        return Official(np.asarray([d.class_id for d in found], np.int64),
                        np.asarray([d.box for d in found], np.float32).reshape(-1, 4),
                        np.asarray([d.score for d in found], np.float32))

    async def infer(self, data: bytes | memoryview | None = None,
                    prepared: PreparedImage | None = None) -> Official:
        """One image through the engine, answered in the official layout (all its
        detections, boxes in original pixels, unclipped): from an upload, or from a tensor
        already preprocessed by the client."""
        trace = current_trace.get()
        started = time.perf_counter() if trace is not None else 0.0
        place = self.runs.place()
        try:
            if prepared is None:
                assert data is not None
                prepared = await self._prepare_in_pool(data, place)
            elif place.shared:  # a client's tensor, into its slot (off the loop)
                assert place.view is not None
                await self._in_pool(np.copyto, place.view, prepared.pixels)
                prepared = replace(prepared, pixels=place.view)
            queued = time.perf_counter() if trace is not None else 0.0
            row = await self.runs.submit(prepared, self.settings.request_timeout_s)
        finally:
            place.release()
        returned = time.perf_counter()
        official = Official(row.labels, original_boxes(row.boxes, prepared.letterbox),
                            row.scores)
        finished = time.perf_counter()
        self.metrics.postprocess.observe(finished - returned)
        if trace is not None:
            trace.image(started, queued, (row,), returned, finished)
        return official

    def start_render(self) -> None:
        """Take a place for one render (MAX_RENDERS at once), or raise Overloaded; give it back
        with ``end_render`` once its response is sent."""
        if self._renders >= self.settings.max_renders:
            raise Overloaded(retry_after_s=1)
        self._renders += 1

    def end_render(self) -> None:
        self._renders -= 1

    async def render(self, data: bytes, result: DetectResult, fmt: ImageFormat,
                     orientation: OrientationMode | None = None) -> bytes:
        """The upload at full resolution, in the frame its boxes are in (turned as its EXIF
        says, or as stored), with ``result``'s detections drawn, encoded."""
        orientation = orientation or self.settings.orientation

        def work() -> bytes:
            if self.settings.preprocess == "exact":
                image = bgr(open_rgb(data, self.settings.max_pixels, orientation))
            else:
                image = decode(data, self.settings.max_pixels, orientation=orientation).image
            return encode_image(draw(image, result.detections), fmt)

        return await asyncio.get_running_loop().run_in_executor(self._render_pool, work)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests; let the admitted ones (reading, decoding, queued, running)
        finish. Returns False if ``timeout_s`` passed first."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while (self._admitted or self._pins) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await self.runs.drain(max(0.0, deadline - time.monotonic()))

    def pin(self) -> None:
        """A front end's pool now sends runs here (app.engine_process): drains wait for it."""
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1

    async def stop(self) -> None:
        await self.runs.stop()
        self._decode_pool.shutdown()
        self._render_pool.shutdown(wait=False, cancel_futures=True)
