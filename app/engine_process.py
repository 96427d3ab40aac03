"""The engine process (FRONTENDS > 1): it owns the models (sessions, warm-up, the batchers, the
repository and its live changes) and runs the images every front end sends, batched together.

Front ends connect to its Unix socket (app.link). Each sends its slot pools, then a ``Run`` per
image; the image is already in a slot, which the batcher reads when it stacks a batch. Every
run is answered exactly once (its result, or why not), and only once its batch no longer reads
the slot. The models' state goes to every front end whenever it changes; a load or unload asked
through one front end is answered once every front end has seen it.
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
from pathlib import Path

from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import ClientClosed, EngineFailure, ServiceError
from app.imaging import PreparedImage
from app.link.channel import Channel, ChannelClosed
from app.link.messages import (
    Cancel,
    Control,
    Done,
    Hello,
    Pool,
    PoolClosed,
    Result,
    Run,
    State,
    StateSeen,
    VersionView,
    failed,
)
from app.link.slots import SlotPool
from app.metrics import Metrics
from app.registry import ModelRegistry

log = logging.getLogger("dfine.engine")

RUNTIME_DIR_ENV = "DFINE_RUNTIME_DIR"
SOCKET_NAME = "engine.sock"
STATE_CHECK_S = 0.1  # how often readiness and stuck runs are looked at besides the changes
ACK_TIMEOUT_S = 2.0  # a control call waits this long, at most, for every front end's ack


def socket_path() -> Path:
    return Path(os.environ[RUNTIME_DIR_ENV]) / SOCKET_NAME


class FrontendSession:
    """One front end's connection: its pools and its runs in flight."""

    def __init__(self, host: EngineHost, channel: Channel) -> None:
        self.host, self.channel = host, channel
        self.name = "front end ?"
        self.pools: dict[int, SlotPool] = {}
        self.runs: dict[int, asyncio.Task[None]] = {}
        self.seen = -1  # the last State it acknowledged
        self.task: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        try:
            while True:
                message, fds = await self.channel.receive()
                self._handle(message, fds)
        except ChannelClosed:
            pass
        finally:
            await self._close()

    def _handle(self, message: object, fds: list[int]) -> None:
        if isinstance(message, Run):
            self.runs[message.id] = asyncio.get_running_loop().create_task(self._run(message))
        elif isinstance(message, Cancel):
            task = self.runs.get(message.id)
            if task is not None:
                task.cancel()
        elif isinstance(message, StateSeen):
            self.seen = message.seq
            self.host.acked()
        elif isinstance(message, Pool):
            self.pools[message.pool] = SlotPool.attach(fds.pop(0), message.shape, message.count)
        elif isinstance(message, PoolClosed):
            pool = self.pools.pop(message.pool, None)
            if pool is not None:
                pool.close()
        elif isinstance(message, Control):
            asyncio.get_running_loop().create_task(self.host.control(self, message))
        elif isinstance(message, Hello):
            self.name = f"front end {message.frontend} (pid {message.pid})"
            log.info("%s connected", self.name)
            self.channel.send(self.host.state())
        for fd in fds:  # none expected: never leak one
            os.close(fd)

    async def _run(self, message: Run) -> None:
        try:
            detector = self.host.registry.resolve(message.name, message.version)
            pool = self.pools[message.pool]
            image = PreparedImage(pool.view(message.slot), message.width, message.height,
                                  message.target_size_wh)
            assert detector.batcher is not None
            row = await detector.batcher.submit(image, message.timeout_s,
                                                hold_while_running=True)
            del image  # the slot's view: the front end may write it again once answered
            self.channel.send(Result(message.id, row.labels.tobytes(), row.boxes.tobytes(),
                                     row.scores.tobytes(), row.run_started, row.run_finished,
                                     row.batch_size))
        except ServiceError as exc:
            self._answer_failed(message.id, exc)
        except asyncio.CancelledError:
            self._answer_failed(message.id, ClientClosed())
        except Exception:
            log.exception("run %d of %s failed", message.id, self.name)
            self._answer_failed(message.id, EngineFailure())
        finally:
            self.runs.pop(message.id, None)

    def _answer_failed(self, id: int, exc: ServiceError) -> None:
        with contextlib.suppress(ChannelClosed):
            self.channel.send(failed(id, exc))

    async def _close(self) -> None:
        """The front end has gone (or the engine stops): its queued runs are dropped, its
        running ones finish, then its pools are let go."""
        self.host.sessions.discard(self)
        for task in list(self.runs.values()):
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
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

    # --- state ----------------------------------------------------------------------------

    def _signature(self) -> object:
        registry = self.registry
        return (tuple((d.name, d.version, id(d)) for d in registry.detectors()),
                tuple(registry.index()), registry.started, registry.ready, registry.hung,
                registry.failure, registry.accepting)

    def state(self) -> State:
        registry = self.registry
        index = tuple(registry.index())
        versions = tuple(
            VersionView(d.name, d.version, d.engine.info, d.settings, d.engine.parallel,
                        tuple(d.engine.buckets or ()), d.engine.report(), d.max_admitted)
            for d in registry.detectors())
        return State(
            self._seq, versions, index,
            known=frozenset(s.name for s in index) | {v.name for v in versions},
            loading=frozenset(s.name for s in index if s.state == "LOADING"),
            started=registry.started, ready=registry.ready, hung=registry.hung,
            failure=registry.failure,
            memory_bound_bytes=self.memory_bound_bytes)

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
            session.channel.send(failed(message.id, exc))
            return
        except Exception:
            log.exception("%s of %s failed", message.action, message.name)
            session.channel.send(failed(message.id, EngineFailure(f"{message.action} failed")))
            return
        await self._all_seen(self.broadcast(force=True))
        with contextlib.suppress(ChannelClosed):
            session.channel.send(Done(message.id))

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

