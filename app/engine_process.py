"""The engine process (FRONTENDS > 1): it owns the models (sessions, warm-up, the batchers, the
repository and its live changes) and runs the images every front end sends, batched together.

Front ends connect to its Unix socket (app.link). Each sends its slot pools, then a ``Run`` per
image; the image is already in a slot, which the batcher reads when it stacks a batch. Every
run is answered exactly once (its result, or why not), and only once its batch no longer reads
the slot. The models' state goes to every front end whenever it changes; a load or unload asked
through one front end is answered once every front end has seen it. So is a change of the log
or trace settings: the engine process keeps the service's (and its own log level follows them),
and sends them in the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from app.api.v2_logging import log_control
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import ClientClosed, EngineFailure, NotReady, ServiceError
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
    failed,
)
from app.link.slots import SlotPool
from app.metrics import Metrics
from app.registry import ModelRegistry
from app.service import Detector
from app.tracing import TraceSettings, start_values

log = logging.getLogger("dfine.engine")

RUNTIME_DIR_ENV = "DFINE_RUNTIME_DIR"
SOCKET_NAME = "engine.sock"
STATE_CHECK_S = 0.1  # how often readiness and stuck runs are looked at besides the changes
ACK_TIMEOUT_S = 2.0  # a control call waits this long, at most, for every front end's ack


def socket_path() -> Path:
    return Path(os.environ[RUNTIME_DIR_ENV]) / SOCKET_NAME


@dataclass
class _BoundPool:
    """A front end's pool and the loaded version its images run on (None: gone already)."""

    slots: SlotPool
    detector: Detector | None


class FrontendSession:
    """One front end's connection: its pools and its runs in flight."""

    def __init__(self, host: EngineHost, channel: Channel) -> None:
        self.host, self.channel = host, channel
        self.name = "front end ?"
        self.pools: dict[int, _BoundPool] = {}
        self.runs: dict[int, asyncio.Task[Any]] = {}  # a RunMany: one task for its ids
        self.seen = -1  # the last State it acknowledged
        self.task: asyncio.Task[None] | None = None
        self.calls: set[asyncio.Task[None]] = set()  # its control calls and changes

    async def serve(self) -> None:
        try:
            while True:
                message, fds = await self.channel.receive()
                try:
                    self._handle(message, fds)
                except Exception:  # one bad message must not end the front end's session
                    log.exception("%s: cannot handle %s", self.name, type(message).__name__)
        except ChannelClosed:
            pass
        finally:
            await self._close()

    def _handle(self, message: object, fds: list[int]) -> None:
        if isinstance(message, Run):
            task = asyncio.get_running_loop().create_task(self._run(message))
            self.runs[message.id] = task
            # Answered from the task's end, not its body: a task cancelled before it starts
            # (its Cancel read with its Run) runs none of its body.
            task.add_done_callback(partial(self._answer, message.id))
        elif isinstance(message, RunMany):
            group = asyncio.get_running_loop().create_task(self._run_many(message))
            ids = [run.id for run in message.runs]
            for id in ids:
                self.runs[id] = group
            group.add_done_callback(partial(self._answer_many, ids))
        elif isinstance(message, Cancel):
            running = self.runs.get(message.id)
            if running is not None:
                running.cancel()
        elif isinstance(message, StateSeen):
            self.seen = message.seq
            self.host.acked()
        elif isinstance(message, Pool):
            self._bind(message, fds.pop(0))
        elif isinstance(message, PoolClosed):
            self._unbind(message.pool)
        elif isinstance(message, Control):
            self._call(self.host.control(self, message))
        elif isinstance(message, ChangeSettings):
            self._call(self.host.change_settings(self, message))
        elif isinstance(message, Hello):
            self.name = f"front end {message.frontend} (pid {message.pid})"
            log.info("%s connected", self.name)
            if message.runtime is not None:
                self.host.take_over(message.runtime, self.name)
            self.channel.send(self.host.state())
        for fd in fds:  # none expected: never leak one
            os.close(fd)

    def _call(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self.calls.add(task)  # (the loop keeps only a weak reference)
        task.add_done_callback(self.calls.discard)

    def _bind(self, message: Pool, fd: int) -> None:
        """A pool for a loaded version; that version is kept open (pinned) until the pool is
        closed, so that the front end's requests admitted on it finish on it."""
        detector = next((d for d in self.host.registry.detectors()
                         if d.serial == message.detector), None)
        if detector is not None:
            detector.pin()
        self.pools[message.pool] = _BoundPool(
            SlotPool.attach(fd, message.shape, message.count), detector)

    def _unbind(self, pool_id: int) -> None:
        pool = self.pools.pop(pool_id, None)
        if pool is not None:
            pool.slots.close()
            if pool.detector is not None:
                pool.detector.unpin()

    async def _run(self, message: Run) -> Result | Failed:
        pool = self.pools.get(message.pool)
        if pool is None or pool.detector is None or pool.detector.batcher is None:
            # A pool of the engine process that died before this one, or of a version gone.
            return failed(message.id, NotReady("the model version is not loaded any more"))
        image = PreparedImage(pool.slots.view(message.slot), message.width, message.height,
                              message.target_size_wh)
        try:
            row = await pool.detector.batcher.submit(image, message.timeout_s,
                                                     hold_while_running=True)
        except ServiceError as exc:
            return failed(message.id, exc)
        except Exception:
            log.exception("run %d of %s failed", message.id, self.name)
            return failed(message.id, EngineFailure())
        return Result(message.id, row.labels.tobytes(), row.boxes.tobytes(),
                      row.scores.tobytes(), row.run_started, row.run_finished, row.batch_size)

    async def _run_many(self, message: RunMany) -> list[Result | Failed]:
        """The runs of one RunMany, queued under one lock of their version's batcher."""
        first = message.runs[0]
        pool = self.pools.get(first.pool)
        if (pool is None or pool.detector is None or pool.detector.batcher is None
                or any(run.pool != first.pool for run in message.runs)):
            return [failed(run.id, NotReady("the model version is not loaded any more"))
                    for run in message.runs]
        images = [PreparedImage(pool.slots.view(run.slot), run.width, run.height,
                                run.target_size_wh) for run in message.runs]
        try:
            rows = await pool.detector.batcher.submit_many(images, first.timeout_s,
                                                           hold_while_running=True)
        except ServiceError as exc:
            return [failed(run.id, exc) for run in message.runs]
        except Exception:
            log.exception("runs %d.. of %s failed", first.id, self.name)
            return [failed(run.id, EngineFailure()) for run in message.runs]
        return [Result(run.id, row.labels.tobytes(), row.boxes.tobytes(),
                       row.scores.tobytes(), row.run_started, row.run_finished, row.batch_size)
                for run, row in zip(message.runs, rows)]

    def _answer_many(self, ids: list[int], task: asyncio.Task[list[Result | Failed]]) -> None:
        for id in ids:
            self.runs.pop(id, None)
        answers = ([failed(id, ClientClosed()) for id in ids] if task.cancelled()
                   else task.result())
        with contextlib.suppress(ChannelClosed):
            for answer in answers:
                self.channel.send(answer)

    def _answer(self, id: int, task: asyncio.Task[Result | Failed]) -> None:
        """Every run is answered once, when it no longer reads its slot."""
        self.runs.pop(id, None)
        answer = failed(id, ClientClosed()) if task.cancelled() else task.result()
        with contextlib.suppress(ChannelClosed):
            self.channel.send(answer)

    async def _close(self) -> None:
        """The front end has gone (or the engine stops): its queued runs are dropped, its
        running ones finish, then its pools are let go."""
        self.host.sessions.discard(self)
        for task in list(self.runs.values()):
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)
        for pool_id in list(self.pools):
            self._unbind(pool_id)
        self.channel.close()
        self.host.acked()
        log.info("%s disconnected", self.name)


class EngineHost:
    """The registry, served to the front ends over the engine socket."""

    def __init__(self, settings: Settings, metrics: Metrics, registry: ModelRegistry) -> None:
        self.settings, self.metrics, self.registry = settings, metrics, registry
        self.sessions: set[FrontendSession] = set()
        self._seq = 0
        self._last_signature: object = None
        self._broadcast_pending = False
        self._acks = asyncio.Event()
        registry.on_change = self._changed
        # The service's log and trace settings (FRONTENDS > 1): changed through any front end,
        # applied here (the log level) and followed by every front end, through the state.
        self.log = log_control(settings.log_format)
        self.trace = TraceSettings(start_values(settings))
        self.revision = 0  # the changes taken

    # --- state ----------------------------------------------------------------------------

    def _signature(self) -> object:
        registry = self.registry
        return (tuple((d.name, d.version, d.serial) for d in registry.detectors()),
                tuple(registry.index()), registry.started, registry.ready, registry.hung,
                registry.failure, registry.accepting)

    def state(self) -> State:
        registry = self.registry
        index = tuple(registry.index())
        versions = tuple(
            VersionView(d.name, d.version, d.serial, d.engine.info, d.settings,
                        d.engine.parallel, tuple(d.engine.buckets or ()), d.engine.report(),
                        d.max_admitted)
            for d in registry.detectors())
        return State(
            self._seq, versions, index,
            known=frozenset(s.name for s in index) | {v.name for v in versions},
            loading=frozenset(s.name for s in index if s.state == "LOADING"),
            started=registry.started, ready=registry.ready, hung=registry.hung,
            failure=registry.failure,
            memory_bound_bytes=self.memory_bound_bytes,
            runtime=RuntimeSettings(self.revision, self.log.current, self.trace.config()))

    @property
    def memory_bound_bytes(self) -> int:
        """What the engine process holds for requests: a batch being stacked per run in
        flight (the images themselves stay in the front ends' slots)."""
        total = 0
        for detector in self.registry.detectors():
            info = detector.engine.info
            tensor = 3 * info.input_width * info.input_height * 4
            total += detector.engine.parallel.instances * detector.max_batch_size * tensor
        return total

    def _changed(self) -> None:
        """The registry changed: one broadcast, after the change's step of the loop."""
        if not self._broadcast_pending:
            self._broadcast_pending = True
            asyncio.get_running_loop().call_soon(self.broadcast)

    def broadcast(self, force: bool = False) -> int:
        """Send the state to every front end if it changed; returns its sequence number."""
        self._broadcast_pending = False
        signature = self._signature()
        if signature == self._last_signature and not force:
            return self._seq
        self._last_signature = signature
        self._seq += 1
        state = self.state()
        for session in list(self.sessions):
            with contextlib.suppress(ChannelClosed):
                session.channel.send(state)
        return self._seq

    def acked(self) -> None:
        self._acks.set()

    async def _all_seen(self, seq: int) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while any(s.seen < seq for s in self.sessions) and time.monotonic() < deadline:
            self._acks.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acks.wait(), deadline - time.monotonic())

    async def watch_state(self) -> None:
        """Readiness also turns on stuck runs and drains, which no registry change reports."""
        while True:
            await asyncio.sleep(STATE_CHECK_S)
            self.broadcast()

    # --- model control --------------------------------------------------------------------

    async def control(self, session: FrontendSession, message: Control) -> None:
        try:
            if message.action == "load":
                await self.registry.load(message.name)
            else:
                await self.registry.unload(message.name)
        except ServiceError as exc:
            with contextlib.suppress(ChannelClosed):
                session.channel.send(failed(message.id, exc))
            return
        except Exception:
            log.exception("%s of %s failed", message.action, message.name)
            with contextlib.suppress(ChannelClosed):
                session.channel.send(failed(message.id, EngineFailure(f"{message.action} "
                                                                      "failed")))
            return
        await self._all_seen(self.broadcast(force=True))
        with contextlib.suppress(ChannelClosed):
            session.channel.send(Done(message.id))

    # --- log and trace settings -----------------------------------------------------------

    async def change_settings(self, session: FrontendSession, message: ChangeSettings) -> None:
        """Apply a change a front end checked, and answer once every front end has it."""
        try:
            if message.what == "log":
                self.log.update(message.changes)
            else:
                self.trace.update(message.model, message.changes)
        except ServiceError as exc:  # (checked already: only if front ends disagree)
            with contextlib.suppress(ChannelClosed):
                session.channel.send(failed(message.id, exc))
            return
        self.revision += 1
        await self._all_seen(self.broadcast(force=True))
        with contextlib.suppress(ChannelClosed):
            session.channel.send(Done(message.id))

    def take_over(self, runtime: RuntimeSettings, frontend: str) -> None:
        """A front end's settings, while this process has taken no change: it started again
        after the front ends were told of some (those are kept, not the start values)."""
        if self.revision or not runtime.revision:
            return
        self.revision = runtime.revision
        self.log.follow(runtime.log)
        self.trace.follow(runtime.trace)
        log.info("log and trace settings taken over from %s (changed at run time)", frontend)
        self.broadcast(force=True)  # to the front ends that connected before it

    # --- serving --------------------------------------------------------------------------

    async def accept(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(server)
            session = FrontendSession(self, Channel(connection))
            self.sessions.add(session)
            session.task = loop.create_task(session.serve())


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by an engine process that died
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    server.setblocking(False)
    return server


async def serve(settings: Settings, engine: OnnxEngine | None = None) -> None:
    """Load the models and serve the front ends until SIGTERM (then drain and stop)."""
    metrics = Metrics()
    registry = ModelRegistry(settings, metrics)
    host = EngineHost(settings, metrics, registry)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = _listen(socket_path())
    tasks = [loop.create_task(host.accept(server)), loop.create_task(host.watch_state())]
    started = time.perf_counter()
    loading = loop.create_task(registry.start(engine))
    await asyncio.wait([loading, loop.create_task(stopping.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        log.info("engine process started in %.1f s: %s", time.perf_counter() - started,
                 ", ".join(f"{d.name} version {d.version}" for d in registry.detectors())
                 or "no model")
        gc.collect()
        gc.freeze()
        if settings.model_control == "poll":
            tasks.append(loop.create_task(registry.poll_forever()))
    await stopping.wait()
    log.info("engine process stopping: draining what the front ends sent")
    loading.cancel()
    for task in tasks:
        task.cancel()
    await registry.drain(settings.request_timeout_s)
    for session in list(host.sessions):
        session.channel.close()
    await registry.stop()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        socket_path().unlink()


def main(settings: Settings, engine: OnnxEngine | None = None) -> None:
    """``python -m app`` as the engine process (DFINE_ROLE=engine); ``engine``: MODEL_PATH's,
    already loaded (the start fails fast on a model that does not load)."""
    import uvloop

    uvloop.run(serve(settings, engine))

