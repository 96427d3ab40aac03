"""The models and versions being served, and how they change while requests run.

Each loaded version is a ``Detector`` of its own (engine, batcher, admission places). A new
version is loaded, warmed up (every bucket) and checked beside the ones serving, then put in
the routing table in one step of the event loop: requests routed after that go to it, those
admitted before finish on the version that admitted them, which is then drained, stopped and
released. A version that fails to load, warm up or answer sanely stays out, whatever served
before keeps serving, and the failure is in the index, the log and
``dfine_model_events_total{event="load_failed"}``.

It knows nothing of HTTP: it raises the service's errors (app.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from app.api.grpc_gate import memory_bound_bytes as grpc_memory_bound_bytes
from app.api.shm import memory_bound_bytes as shm_memory_bound_bytes
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.engine.instant import load_engine
from app.errors import Conflict, InvalidRequest, LoadFailed, NotFound, NotReady
from app.metrics import Metrics, VersionMetrics
from app.model_repository import (
    MODEL_FILE,
    Fingerprint,
    ModelEntry,
    model_directory,
    scan,
    scan_model,
    single_model,
)
from app.routing import Routing, State, VersionStatus
from app.service import Detector
from app.streams.manager import StreamManager
from app.trim import libc_trim

log = logging.getLogger("dfine.models")

Loader = Callable[[Settings, str], OnnxEngine]  # (settings with model_path, name) -> engine


@dataclass
class _Loaded:
    detector: Detector
    fingerprint: Fingerprint
    metrics: VersionMetrics


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_outputs(engine: OnnxEngine) -> None:
    """One run on a noise image: the answer must be in the official layout's ranges (finite
    boxes, scores in [0, 1], class ids the model has), or the version is not served."""
    info = engine.info
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, info.input_height, info.input_width), dtype=np.float32)
    sizes = np.asarray([[info.input_width, info.input_height]], np.int64)
    out = engine.run(image, sizes)
    if out.scores.ndim != 2 or out.boxes.shape != (*out.scores.shape, 4) \
            or out.labels.shape != out.scores.shape or out.scores.shape[0] != 1:
        raise ValueError(f"outputs of shapes labels {out.labels.shape}, boxes "
                         f"{out.boxes.shape}, scores {out.scores.shape}")
    if not (np.isfinite(out.scores).all() and np.isfinite(out.boxes).all()):
        raise ValueError("outputs that are not finite numbers (NaN or infinity)")
    if out.scores.size and (out.scores.min() < -1e-3 or out.scores.max() > 1 + 1e-3):
        raise ValueError(f"scores outside [0, 1] ({out.scores.min():.3g} to "
                         f"{out.scores.max():.3g})")
    classes = len(info.labels) if info.labels else None
    if out.labels.size and (out.labels.min() < 0
                            or (classes is not None and out.labels.max() >= classes)):
        raise ValueError(f"class ids outside 0..{(classes or 1) - 1}")


class ModelRegistry(Routing):
    """What is served (``resolve``), what the repository holds (``index``), and the changes:
    at start, on each poll, on explicit load and unload calls."""

    def __init__(self, settings: Settings, metrics: Metrics,
                 loader: Loader | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._loader = loader or (lambda s, name: load_engine(s, name))
        self._serving: dict[str, dict[int, _Loaded]] = {}  # the routing table
        self._routes: dict[str, dict[int, Detector]] | None = None  # its detectors (_table)
        self.on_change: Callable[[], None] = lambda: None  # told of every change of state
        self._status: dict[tuple[str, int | None], VersionStatus] = {}
        self._failed: dict[tuple[str, int], Fingerprint] = {}  # not retried until changed
        self._entries: dict[str, ModelEntry] = {}  # the last scan
        self._wanted: set[str] = set()  # models readiness waits for
        self._changes = asyncio.Lock()  # one change at a time: start, polls, calls
        self._retiring: set[asyncio.Task[None]] = set()
        self._trim = libc_trim() or (lambda: None)
        self.started = False  # the start's loads are done
        self.accepting = True
        self.failure: str | None = None  # why the start left a model unserved

    # --- routing (app.routing) -------------------------------------------------------------

    def _table(self) -> dict[str, dict[int, Detector]]:
        # Built once per change of the routing table, not per request.
        if self._routes is None:
            self._routes = {name: {v: loaded.detector for v, loaded in versions.items()}
                            for name, versions in self._serving.items()}
        return self._routes

    def _is_loading(self, name: str) -> bool:
        return any(s.state == "LOADING" for (n, _), s in self._status.items() if n == name)

    def _repository_names(self) -> Collection[str]:
        return self._entries.keys()

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        """Every model in the repository or loaded, each version's state (Triton's index)."""
        lines = []
        for name in sorted(set(self._entries) | set(self._serving)):
            own = sorted((s for (n, _), s in self._status.items() if n == name),
                         key=lambda s: s.version or 0)
            lines += own or [VersionStatus(name, None, "UNAVAILABLE", "not loaded")]
        return [s for s in lines if s.state == "READY"] if ready_only else lines

    @property
    def hung(self) -> bool:
        return any(d.runs.hung_runs > 0 for d in self.detectors())

    @property
    def ready(self) -> bool:
        """Started, and every model it waits for has a version serving (a model is waited
        for if it was in the repository at start or has been loaded since, until it is
        removed or unloaded: a new model that fails to load does not turn a serving
        replica unready)."""
        return (self.started and self.accepting and bool(self._serving)
                and all(name in self._serving for name in self._wanted) and not self.hung)

    @property
    def memory_bound_bytes(self) -> int:
        """What requests may hold at once across every loaded version, the slow uploads, and
        the gRPC messages being read (docs: "Memory")."""
        settings = self.settings
        # gRPC messages being received (admitted ones hold places, counted per version).
        grpc_messages = grpc_memory_bound_bytes(settings)
        tensor = max((d.tensor_bytes for d in self.detectors()), default=0)
        return (sum(d.memory_bound_bytes for d in self.detectors())
                + settings.max_slow_uploads * settings.max_upload_bytes + grpc_messages
                + StreamManager.memory_bound_bytes(settings, tensor)
                + StreamManager.clients_memory_bound_bytes(settings, tensor)
                + shm_memory_bound_bytes(settings))

    # --- changes -------------------------------------------------------------------------

    def _scan(self) -> dict[str, ModelEntry]:
        root = self.settings.model_repository
        return scan(self.settings, root) if root is not None else {
            self.settings.model_path.stem: single_model(self.settings)}

    def _scan_one(self, name: str) -> ModelEntry | None:
        root = self.settings.model_repository
        if root is None:
            entry = single_model(self.settings)
            return entry if entry.name == name else None
        try:
            directory = model_directory(root, name)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return scan_model(self.settings, root, name) if directory.is_dir() else None

    async def start(self, engine: OnnxEngine | None = None) -> None:
        """Load what the repository wants (or serve ``engine``, already loaded)."""
        async with self._changes:
            if engine is not None:
                entry = single_model(self.settings)
                entry = ModelEntry(engine.info.name, {1: entry.versions[1]}, (1,),
                                   self.settings)
                self._entries = {entry.name: entry}
                await self._serve_loaded(entry, 1, engine)
            else:
                try:
                    entries = await asyncio.to_thread(self._scan)
                except OSError as exc:
                    self.failure = str(exc)
                    log.error("cannot read the models: %s", exc)
                    self.started = True
                    self.on_change()
                    return
                await self._apply(entries)
            self._wanted = {n for n, e in self._entries.items() if e.wanted or e.error}
            unserved = sorted(self._wanted - set(self._serving))
            if unserved:
                reasons = [s.reason for s in self.index() if s.name in unserved and s.reason]
                self.failure = f"not served: {', '.join(unserved)}" + (
                    f" ({reasons[0]})" if reasons else "")
                log.error("cannot serve every model: %s", self.failure)
            if not self._entries:
                self.failure = f"no model in {self.settings.model_repository}"
                log.error("%s", self.failure)
            self.started = True
            self.on_change()

    async def poll_forever(self) -> None:
        """MODEL_CONTROL=poll: rescan every REPOSITORY_POLL_S and apply what changed."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                entries = await asyncio.to_thread(self._scan)
            except OSError as exc:
                log.warning("cannot rescan the models (serving on as before): %s", exc)
                continue
            async with self._changes:
                try:
                    await self._apply(entries)
                except Exception:  # a bug must not end the polling: log it, poll on
                    log.exception("applying the repository's changes failed")
                self._wanted = {n for n in self._wanted if n in entries} | set(self._serving)

    async def load(self, name: str) -> None:
        """MODEL_CONTROL=explicit: load (or reload) a model's versions as its policy says;
        versions that failed before are tried again."""
        self._check_control("load")
        self.validate_name(name)
        async with self._changes:
            entry = await asyncio.to_thread(self._scan_one, name)
            if entry is None:
                raise NotFound(f"no model {name!r} in the repository")
            if entry.error is None and not entry.wanted:
                # Loaded, it would serve nothing and hold readiness until unloaded.
                raise LoadFailed(f"model {name!r} has no version to serve (a directory "
                                 f"<version>/{MODEL_FILE} that its version policy wants); "
                                 f"what served before serves on")
            for version in entry.wanted:
                self._failed.pop((name, version), None)
            await self._apply({**self._entries, name: entry}, only=name, strict=True)
            self._wanted.add(name)

    async def unload(self, name: str) -> None:
        """MODEL_CONTROL=explicit: stop serving every version of a model (its requests get
        404 from now on); they drain and are released in the background."""
        self._check_control("unload")
        self.validate_name(name)
        async with self._changes:
            if not self.known(name):
                raise NotFound(f"no model {name!r} in the repository")
            self._wanted.discard(name)
            for version in list(self._serving.get(name, {})):
                self._retire(name, version, "unloaded")

    def _check_control(self, what: str) -> None:
        if self.settings.model_control != "explicit":
            raise Conflict(f"{what} is not allowed with MODEL_CONTROL="
                           f"{self.settings.model_control}; set MODEL_CONTROL=explicit")
        if not self.accepting:
            raise NotReady()

    async def _apply(self, entries: dict[str, ModelEntry], only: str | None = None,
                     strict: bool = False) -> None:
        """Bring what is served in line with ``entries``; with ``strict``, a version that
        cannot be loaded raises (explicit calls) instead of being only recorded."""
        try:
            for name in sorted({only} if only else set(entries) | set(self._serving)):
                entry = entries.get(name)
                if entry is None:  # its directory is gone
                    for version in list(self._serving.get(name, {})):
                        self._retire(name, version, "removed from the repository")
                    self._forget(name, keep=set())
                    continue
                await self._apply_model(entry, strict)
        finally:
            self._entries = entries

    async def _apply_model(self, entry: ModelEntry, strict: bool) -> None:
        name = entry.name
        if entry.error is not None:
            self._note_model_error(name, entry.error)
            if strict:
                raise LoadFailed(f"model {name!r}: {entry.error}")
            return
        self._status.pop((name, None), None)
        loaded = self._serving.get(name, {})
        new = [v for v in entry.wanted
               if (v not in loaded or loaded[v].fingerprint != entry.versions[v].fingerprint)
               and self._failed.get((name, v)) != entry.versions[v].fingerprint]
        others = sum(len(v) for n, v in self._serving.items() if n != name)
        room = self.settings.max_loaded_models - others - len(
            [v for v in entry.wanted if v in loaded and v not in new])
        errors: list[Exception] = []
        for version in sorted(new, reverse=True):  # the newest first, if not all fit
            if room <= 0:
                reason = (f"MAX_LOADED_MODELS={self.settings.max_loaded_models} versions are "
                          f"loaded already; unload one or raise it")
                self._set(name, version, "UNAVAILABLE", reason)
                errors.append(Conflict(f"cannot load version {version} of {name!r}: {reason}"))
                continue
            room -= 1
            failure = await self._load_version(entry, version)
            if failure is not None:
                errors.append(LoadFailed(f"failed to load version {version} of {name!r}: "
                                         f"{failure}"))
        serving = self._serving.get(name, {})
        current = [v for v in entry.wanted if v in serving
                   and serving[v].fingerprint == entry.versions[v].fingerprint]
        # Versions the policy no longer wants go once one it wants serves (or none is
        # wanted at all): a failed new version leaves the old one serving.
        if current or not entry.wanted:
            for version in [v for v in serving if v not in entry.wanted]:
                self._retire(name, version, "superseded" if current else "not wanted")
        self._forget(name, keep=set(entry.versions) | set(self._serving.get(name, {})))
        if strict and errors:
            raise errors[0]

    async def _load_version(self, entry: ModelEntry, version: int) -> str | None:
        """Load, warm up and check one version beside the serving ones, then route to it.
        Returns why it failed, or None."""
        name, files = entry.name, entry.versions[version]
        assert entry.settings is not None
        settings = entry.settings.model_copy(update={"model_path": files.path})
        self._set(name, version, "LOADING")
        metrics = self.metrics.for_version(name, version)
        started = time.perf_counter()
        try:
            def build() -> Detector:
                engine = self._loader(settings, name)
                made = Detector(engine, settings, metrics, version)
                try:
                    made.warm_up()
                    check_outputs(engine)
                except BaseException:
                    engine.close()
                    raise
                return made

            detector = await asyncio.to_thread(build)
        except Exception as exc:
            reason = _one_line(exc)
            self._failed[(name, version)] = files.fingerprint
            if version in self._serving.get(name, {}):  # a rewritten file: the old one serves
                self._set(name, version, "READY", f"its rewritten file failed to load: "
                          f"{reason}; the file loaded before serves on")
            else:
                self._set(name, version, "UNAVAILABLE", f"failed to load: {reason}")
            self.metrics.model_event(name, version, "load_failed")
            if version not in self._serving.get(name, {}):  # not the serving copy's labels
                metrics.close()
            log.error("model %s version %s failed to load (%s); what served before serves on",
                      name, version, reason)
            return reason
        self._failed.pop((name, version), None)
        self._route(name, version, detector, files.fingerprint, metrics, started)
        return None

    async def _serve_loaded(self, entry: ModelEntry, version: int, engine: OnnxEngine) -> None:
        metrics = self.metrics.for_version(entry.name, version)
        detector = Detector(engine, self.settings, metrics, version)
        started = time.perf_counter()
        self._set(entry.name, version, "LOADING")
        try:
            await asyncio.to_thread(detector.warm_up)
            await asyncio.to_thread(check_outputs, engine)
        except Exception as exc:
            self._set(entry.name, version, "UNAVAILABLE", f"failed to warm up: {_one_line(exc)}")
            self.metrics.model_event(entry.name, version, "load_failed")
            log.error("cannot serve the model: %s", exc)
            return
        self._route(entry.name, version, detector, entry.versions[version].fingerprint,
                    metrics, started)

    def _route(self, name: str, version: int, detector: Detector, fingerprint: Fingerprint,
               metrics: VersionMetrics, started: float) -> None:
        """The one step that turns a loaded version on (no await: no request sees half)."""
        info = detector.engine.info
        metrics.info({"format": "onnx", "layout": info.layout,
                      "providers": ",".join(info.providers), "path": info.path.name,
                      "input_size": f"{info.input_width}x{info.input_height}"})
        metrics.queue_capacity.set(detector.settings.max_queue)
        detector.start()
        previous = self._serving.setdefault(name, {}).get(version)
        self._serving[name][version] = _Loaded(detector, fingerprint, metrics)
        self._routes = None
        self._set(name, version, "READY")
        self.metrics.model_event(name, version, "load")
        buckets = detector.engine.buckets
        log.info("model %s version %s serving: warmed up %s and checked in %.1f s; requests "
                 "can hold at most %.0f MB across every version (MAX_QUEUE, MAX_UPLOAD_BYTES, "
                 "MAX_PIXELS)", name, version,
                 f"buckets {','.join(map(str, buckets))}" if buckets
                 else f"batch sizes 1..{detector.max_batch_size}",
                 time.perf_counter() - started, self.memory_bound_bytes / 1e6)
        if previous is not None:  # the same version, rewritten: the old copy retires
            self._spawn_retire(name, version, previous, "replaced by its rewritten file")

    def _retire(self, name: str, version: int, reason: str) -> None:
        """Out of the routing table now; drained, stopped and released in the background."""
        versions = self._serving.get(name, {})
        loaded = versions.pop(version, None)
        if not versions:
            self._serving.pop(name, None)
        self._routes = None
        if loaded is not None:
            self._set(name, version, "UNLOADING", reason)
            self._spawn_retire(name, version, loaded, reason)

    def _spawn_retire(self, name: str, version: int, loaded: _Loaded, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(
            self._release(name, version, loaded, reason))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _release(self, name: str, version: int, loaded: _Loaded, reason: str) -> None:
        """Drain, stop, give the sessions back, hand the freed pages to the system; then the
        index says UNAVAILABLE."""
        detector = loaded.detector
        settings = detector.settings
        finished = await detector.drain(settings.request_timeout_s + settings.engine_timeout_s)
        await detector.stop()
        detector.engine.close()
        del detector
        gc.collect()  # the engine's reference cycles, so that its memory goes now
        # The idle trimmer waits for an idle moment, which a loaded service may not have.
        await asyncio.to_thread(self._trim)
        if (name, version) not in {(n, v) for n in self._serving for v in self._serving[n]}:
            loaded.metrics.close()  # (unless its rewritten file serves under the same labels)
            self._set(name, version, "UNAVAILABLE", reason)
        self.metrics.model_event(name, version, "unload")
        log.info("model %s version %s unloaded (%s)%s", name, version, reason,
                 "" if finished else "; requests still queued after the drain timeout got 503")

    def _set(self, name: str, version: int | None, state: State, reason: str = "") -> None:
        self._status[(name, version)] = VersionStatus(name, version, state, reason)
        self.on_change()

    def _note_model_error(self, name: str, error: str) -> None:
        before = self._status.get((name, None))
        if before is None or before.reason != error:
            log.error("model %s cannot be served: %s", name, error)
            self.metrics.model_event(name, 0, "load_failed")
        self._set(name, None, "UNAVAILABLE", error)

    def _forget(self, name: str, keep: set[int]) -> None:
        """Index lines and failure records of versions no longer on disk nor loaded."""
        for key in [k for k in self._status if k[0] == name and k[1] is not None]:
            if key[1] not in keep and self._status[key].state not in ("LOADING", "UNLOADING"):
                del self._status[key]
        for key in [k for k in self._failed if k[0] == name and k[1] not in keep]:
            del self._failed[key]
        if not keep:
            self._status.pop((name, None), None)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests; let every version's admitted ones finish."""
        self.accepting = False
        self.on_change()
        results = await asyncio.gather(*(d.drain(timeout_s) for d in self.detectors()))
        return all(results)

    async def stop(self) -> None:
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await task
        for detector in self.detectors():
            await detector.stop()

