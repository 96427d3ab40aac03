"""A front end's side of FRONTENDS > 1: the engine process's models, mirrored, and its runs.

The front end is the whole HTTP and gRPC service of app.api: admission, uploads, decoding,
postprocessing and answers, on detectors built from the engine's ``State``. Their images run in
the engine process (``RemoteRuns``): each is decoded straight into a slot of the version's
shared-memory pool, and only the slot's number crosses. While the engine process is away (it
died, or has not started yet) there is no model here: every detection is a 503 and /readyz
fails, until it is back and has said what it serves.

The log and trace settings are the service's: a change taken here goes to the engine process,
which keeps them and sends them to every front end in its state; each follows them
(``RemoteRegistry.share_settings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal, cast

import numpy as np

from app.api.grpc_gate import memory_bound_bytes as grpc_memory_bound_bytes
from app.api.shm import memory_bound_bytes as shm_memory_bound_bytes
from app.api.v2_logging import LogControl, log_control
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import NotReady, Overloaded
from app.imaging import PreparedImage
from app.link.channel import Channel, ChannelClosed
from app.link.messages import (
    Cancel,
    ChangeSettings,
    Control,
    Done,
    Failed,
    Hello,
    Pool,
    PoolClosed,
    Result,
    Run,
    RunMany,
    RuntimeSettings,
    State,
    StateSeen,
    VersionView,
    error_of,
)
from app.link.slots import SlotPool
from app.metrics import Metrics
from app.routing import Routing, VersionStatus
from app.service import Detector, _Row, stream_room
from app.streams.manager import StreamManager
from app.tracing import Changes, Tracing

log = logging.getLogger("dfine.frontend")

FRONTEND_INDEX_ENV = "DFINE_FRONTEND_INDEX"
RECONNECT_S = 0.2
# Slots beyond the version's admission places (at least a batch per run in flight): a request
# whose client left gives its place back at once, its slot only once the engine has answered
# its run, which is once its batch is over.
SPARE_SLOTS = 8


class EngineView:
    """What a detector reads of its engine, from the engine process's ``VersionView``."""

    def __init__(self, view: VersionView) -> None:
        self.info = view.info
        self.parallel = view.parallel
        self.buckets = view.buckets
        self._report = view.report

    def report(self) -> dict[str, Any]:
        return self._report


class SlotPlace:
    """A slot of a version's pool, held by a request until its run is sent, then by the
    engine until it answers."""

    shared = True

    def __init__(self, runs: RemoteRuns, slot: int) -> None:
        self.runs, self.slot = runs, slot
        self.view: np.ndarray[Any, np.dtype[np.float32]] | None = runs.pool.view(slot)
        self.with_engine = False
        self._given_back = False

    def release(self) -> None:
        """The request is done with it: back to the pool, unless the engine holds it."""
        if not self.with_engine:
            self.give_back()

    def give_back(self) -> None:
        if not self._given_back:
            self._given_back = True
            self.view = None
            self.runs.given_back(self.slot)


class RemoteRuns:
    """One version's runs, in the engine process, from its slot pool."""

    hung_runs = 0  # the engine's stuck runs count in the State it sends

    def __init__(self, link: EngineLink, view: VersionView, pool_id: int, count: int) -> None:
        self.link, self.name, self.version = link, view.name, view.version
        shape = (3, view.info.input_height, view.info.input_width)
        self.pool_id = pool_id
        self.pool = SlotPool.create(f"dfine-{view.name}-{view.version}", shape, count)
        self._held: dict[int, SlotPlace] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        # The connection the engine knows this pool on: after a reconnect (a new engine
        # process) its runs are refused here, not sent with a pool number it never saw.
        self.channel = link.channel
        try:
            link.send(Pool(pool_id, view.serial, shape, count), fds=(self.pool.fd,))
        except BaseException:
            self.pool.close()
            raise

    def start(self) -> None:
        pass

    def place(self) -> SlotPlace:
        slot = self.pool.take()
        if slot is None:  # every slot is held by runs whose clients left: rare, and brief
            raise Overloaded(retry_after_s=1)
        place = SlotPlace(self, slot)
        self._held[slot] = place
        self._idle.clear()
        return place

    def given_back(self, slot: int) -> None:
        self._held.pop(slot, None)
        self.pool.give_back(slot)
        if not self._held:
            self._idle.set()

    async def submit(self, payload: PreparedImage, timeout_s: float) -> _Row:
        """``payload``'s pixels are a slot this pool's ``place`` gave (the detector decodes,
        or copies a client's tensor, into it)."""
        slot = self.pool.slot_of(payload.pixels)
        place = self._held.get(slot) if slot is not None else None
        assert place is not None, "the image is not in a slot of this version's pool"
        place.with_engine = True
        return await self.link.run(self, place, payload, timeout_s)

    async def submit_many(self, payloads: list[PreparedImage], timeout_s: float
                          ) -> list[_Row]:
        """``submit`` for several images at once (one RunMany): queued together."""
        places = []
        for payload in payloads:
            slot = self.pool.slot_of(payload.pixels)
            place = self._held.get(slot) if slot is not None else None
            assert place is not None, "the image is not in a slot of this version's pool"
            place.with_engine = True
            places.append(place)
        return await self.link.run_many(self, places, payloads, timeout_s)

    async def drain(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def stop(self) -> None:
        if self.link.connected:
            with contextlib.suppress(ChannelClosed):
                self.link.send(PoolClosed(self.pool_id))
        self.pool.close()


@dataclasses.dataclass
class _Pending:
    future: asyncio.Future[_Row]
    place: SlotPlace


class EngineLink:
    """The connection to the engine process: it reconnects whenever it is lost."""

    def __init__(self, path: str, frontend: int) -> None:
        self.path, self.frontend = path, frontend
        self.channel: Channel | None = None
        self._ids: Iterator[int] = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._calls: dict[int, asyncio.Future[None]] = {}
        self.on_state: Any = None  # set by RemoteRegistry
        self.on_lost: Any = None
        self.runtime: RuntimeSettings | None = None  # the settings of the last State

    @property
    def connected(self) -> bool:
        return self.channel is not None and not self.channel.closed

    def send(self, message: object, fds: tuple[int, ...] = ()) -> None:
        if self.channel is None or self.channel.closed:
            raise ChannelClosed()
        self.channel.send(message, fds)

    async def run(self, runs: RemoteRuns, place: SlotPlace, image: PreparedImage,
                  timeout_s: float) -> _Row:
        id = next(self._ids)
        try:
            if runs.channel is not self.channel:
                raise ChannelClosed()
            self.send(Run(id, runs.name, runs.version, runs.pool_id, place.slot, image.width,
                          image.height, image.target_size_wh, timeout_s))
        except ChannelClosed:
            place.give_back()
            raise NotReady("the engine process is not running") from None
        future: asyncio.Future[_Row] = asyncio.get_running_loop().create_future()
        self._pending[id] = _Pending(future, place)
        try:
            return await future
        except asyncio.CancelledError:
            if id in self._pending and self.connected:
                self.send(Cancel(id))
            raise

    async def run_many(self, runs: RemoteRuns, places: list[SlotPlace],
                       images: list[PreparedImage], timeout_s: float) -> list[_Row]:
        ids = [next(self._ids) for _ in images]
        try:
            if runs.channel is not self.channel:
                raise ChannelClosed()
            self.send(RunMany(tuple(
                Run(id, runs.name, runs.version, runs.pool_id, place.slot, image.width,
                    image.height, image.target_size_wh, timeout_s)
                for id, place, image in zip(ids, places, images))))
        except ChannelClosed:
            for place in places:
                place.give_back()
            raise NotReady("the engine process is not running") from None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[_Row]] = [loop.create_future() for _ in ids]
        for id, future, place in zip(ids, futures, places):
            self._pending[id] = _Pending(future, place)
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            # The request has gone: a Cancel of one cancels them all in the engine process,
            # which still answers each once it no longer reads its slot (its place is given
            # back then).
            waiting = next((id for id in ids if id in self._pending), None)
            if waiting is not None and self.connected:
                self.send(Cancel(waiting))
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return cast(list[_Row], results)

    async def control(self, action: str, name: str) -> None:
        await self._call(lambda id: Control(id, action, name))  # type: ignore[arg-type]

    async def change(self, what: Literal["log", "trace"], changes: dict[str, Any],
                     model: str | None = None) -> None:
        """A log or trace settings change, answered once every front end follows it."""
        await self._call(lambda id: ChangeSettings(id, what, changes, model))

    async def _call(self, message: Callable[[int], object]) -> None:
        """Send ``message(id)`` and wait for the engine's Done (or Failed) for ``id``."""
        id = next(self._ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._calls[id] = future
        try:
            try:
                self.send(message(id))
            except ChannelClosed:
                raise NotReady("the engine process is not running") from None
            await future
        finally:
            self._calls.pop(id, None)

    async def keep_connected(self) -> None:
        """Connect, serve the connection until it is lost, and again, for ever."""
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError:
                sock.close()
                await asyncio.sleep(RECONNECT_S)
                continue
            self.channel = Channel(sock)
            self.channel.send(Hello(self.frontend, os.getpid(), self.runtime))
            log.info("connected to the engine process")
            try:
                await self._serve(self.channel)
            finally:
                self.channel.close()
                self._lost()
            log.warning("the engine process has gone: answering 503 until it is back")
            await asyncio.sleep(RECONNECT_S)

    async def _serve(self, channel: Channel) -> None:
        with contextlib.suppress(ChannelClosed):
            while True:
                message, fds = await channel.receive()
                for fd in fds:
                    os.close(fd)
                if isinstance(message, Result):
                    self._settle(message.id, result=message)
                elif isinstance(message, Failed):
                    if message.id in self._calls:
                        self._end_call(message.id, message)
                    else:
                        self._settle(message.id, failure=message)
                elif isinstance(message, Done):
                    self._end_call(message.id, None)
                elif isinstance(message, State):
                    self.runtime = message.runtime or self.runtime
                    self.on_state(message)
                    channel.send(StateSeen(message.seq))

    def _settle(self, id: int, result: Result | None = None, failure: Failed | None = None
                ) -> None:
        pending = self._pending.pop(id, None)
        if pending is None:
            return
        pending.place.give_back()  # the engine is done with the slot
        if pending.future.done():
            return
        if result is not None:
            labels = np.frombuffer(result.labels, np.int64)
            pending.future.set_result(_Row(
                labels, np.frombuffer(result.boxes, np.float32).reshape(len(labels), 4),
                np.frombuffer(result.scores, np.float32), result.run_started,
                result.run_finished, result.batch_size))
        else:
            assert failure is not None
            pending.future.set_exception(error_of(failure))

    def _end_call(self, id: int, failure: Failed | None) -> None:
        future = self._calls.get(id)
        if future is not None and not future.done():
            if failure is None:
                future.set_result(None)
            else:
                future.set_exception(error_of(failure))

    def _lost(self) -> None:
        """Every run in flight fails with 503; their slots are free (the engine that read
        them is gone)."""
        pending, self._pending = self._pending, {}
        for item in pending.values():
            item.place.give_back()
            if not item.future.done():
                item.future.set_exception(NotReady("the engine process has gone"))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(NotReady("the engine process has gone"))
        if self.on_lost is not None:
            self.on_lost()


class RemoteRegistry(Routing):
    """The engine process's models as this front end serves them (app.registry's interface)."""

    def __init__(self, settings: Settings, metrics: Metrics, link: EngineLink,
                 frontends: int) -> None:
        self.settings, self.metrics, self.link, self.frontends = (settings, metrics, link,
                                                                   frontends)
        self.started = False
        self.accepting = True
        self.failure: str | None = None
        self._state: State | None = None
        self._routes: dict[str, dict[int, Detector]] = {}
        self._serials: set[int] = set()
        self._pools = itertools.count(1)
        self._retiring: set[asyncio.Task[None]] = set()
        self._first_state = asyncio.Event()
        self._tracing: Tracing | None = None
        self._log: LogControl | None = None
        link.on_state, link.on_lost = self._apply, self._lost

    # --- the service's log and trace settings ---------------------------------------------

    def share_settings(self, tracing: Tracing) -> None:
        """Make ``tracing``'s and this process's log settings the service's: changes go to the
        engine process (``change_trace``, ``change_log``), and each State's are followed."""
        self._tracing, self._log = tracing, log_control(self.settings.log_format)
        tracing.share = self._log.share = self
        self._follow(self.link.runtime)

    def _follow(self, runtime: RuntimeSettings | None) -> None:
        if runtime is None or self._tracing is None or self._log is None:
            return
        self._log.follow(runtime.log)
        self._tracing.follow(runtime.trace)

    async def change_trace(self, model: str | None, changes: Changes) -> None:
        await self.link.change("trace", changes, model)

    async def change_log(self, changes: dict[str, Any]) -> None:
        await self.link.change("log", changes)

    # --- app.routing ----------------------------------------------------------------------

    def _table(self) -> dict[str, dict[int, Detector]]:
        return self._routes

    def _is_loading(self, name: str) -> bool:
        return self._state is not None and name in self._state.loading

    def _repository_names(self) -> Collection[str]:
        return self._state.known if self._state is not None else ()

    # --- what the routes read -------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        lines = list(self._state.index) if self._state is not None else []
        return [s for s in lines if s.state == "READY"] if ready_only else lines

    @property
    def hung(self) -> bool:
        return self._state is not None and self._state.hung

    @property
    def ready(self) -> bool:
        return (self.link.connected and self._state is not None and self._state.ready
                and self.accepting and bool(self._routes))

    @property
    def memory_bound_bytes(self) -> int:
        """This front end's share: what its requests may hold (the service's bound is every
        front end's and the engine process's: ``service_memory_bound_bytes``)."""
        settings = self.settings
        return (sum(d.memory_bound_bytes for d in self.detectors())
                + settings.max_slow_uploads * settings.max_upload_bytes
                + grpc_memory_bound_bytes(settings)
                + StreamManager.clients_memory_bound_bytes(settings, self._tensor_bytes))

    @property
    def _tensor_bytes(self) -> int:
        return max((d.tensor_bytes for d in self.detectors()), default=0)

    @property
    def service_memory_bound_bytes(self) -> int:
        """Every front end's share, the engine process's, and the streams' (front end 0
        runs them)."""
        engine = self._state.memory_bound_bytes if self._state is not None else 0
        streams = StreamManager.memory_bound_bytes(self.settings, self._tensor_bytes)
        return (self.frontends * self.memory_bound_bytes + engine + streams
                + shm_memory_bound_bytes(self.settings))  # segments: the service's, once

    # --- the engine's state ---------------------------------------------------------------

    def _apply(self, state: State) -> None:
        """Mirror the engine's models: new versions get a detector (and a slot pool), gone
        ones leave the routing table now and drain in the background."""
        # By the engine's serial, not (name, version): a rewritten file is a new copy.
        serving = {d.serial: d for versions in self._routes.values() for d in versions.values()}
        routes: dict[str, dict[int, Detector]] = {}
        for view in state.versions:
            detector = serving.pop(view.serial, None) or self._detector(view)
            routes.setdefault(view.name, {})[view.version] = detector
        for detector in serving.values():
            self._retire(detector)
        added = any(view.serial not in self._serials for view in state.versions)
        self._serials = {view.serial for view in state.versions}
        self._routes, self._state = routes, state
        self.started, self.failure = state.started, state.failure
        self._follow(state.runtime)  # before the State is acknowledged
        if added and self.link.frontend == 0:  # one line for the service, not one each
            log.info("requests can hold at most %.0f MB across the service: %d front ends of "
                     "%.0f MB each (uploads, decodes, slots) and the engine process's %.0f MB "
                     "(batches being stacked)", self.service_memory_bound_bytes / 1e6,
                     self.frontends, self.memory_bound_bytes / 1e6,
                     state.memory_bound_bytes / 1e6)
        if state.started:
            self._first_state.set()

    def _detector(self, view: VersionView) -> Detector:
        metrics = self.metrics.for_version(view.name, view.version)
        engine = cast(OnnxEngine, EngineView(view))
        # Spare slots: runs whose clients left hold theirs until their batch is over.
        spare = max(SPARE_SLOTS, view.parallel.instances * view.parallel.max_batch_size)
        # Streams' frames and clients' frames take slots beyond the admitted requests' too.
        runs = RemoteRuns(self.link, view, next(self._pools),
                          view.max_admitted + spare + stream_room(self.settings))
        detector = Detector(engine, view.settings, metrics, view.version, runs=runs)
        detector.serial = view.serial
        detector.start()
        return detector

    def _retire(self, detector: Detector) -> None:
        async def release() -> None:
            settings = detector.settings
            await detector.drain(settings.request_timeout_s)
            await detector.stop()

        task = asyncio.get_running_loop().create_task(release())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _lost(self) -> None:
        for versions in self._routes.values():
            for detector in versions.values():
                self._retire(detector)
        self._routes, self._state, self._serials = {}, None, set()
        self.started = False

    # --- the lifespan ---------------------------------------------------------------------

    async def start(self, engine: OnnxEngine | None = None) -> None:
        """Connect (in the background, for ever) and wait for the engine's first state."""
        assert engine is None, "a front end loads no model"
        task = asyncio.get_running_loop().create_task(self.link.keep_connected())
        self._retiring.add(task)  # kept, and cancelled at stop
        await self._first_state.wait()

    async def poll_forever(self) -> None:
        """The engine process polls the repository."""

    async def load(self, name: str) -> None:
        self.validate_name(name)
        await self.link.control("load", name)

    async def unload(self, name: str) -> None:
        self.validate_name(name)
        await self.link.control("unload", name)

    async def drain(self, timeout_s: float) -> bool:
        self.accepting = False
        results = await asyncio.gather(*(d.drain(timeout_s) for d in self.detectors()))
        return all(results)

    async def stop(self) -> None:
        for detector in self.detectors():
            await detector.stop()
        for task in list(self._retiring):
            task.cancel()
        if self.link.channel is not None:
            self.link.channel.close()
