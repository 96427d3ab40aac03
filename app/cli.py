"""``dfine-serve`` / ``python -m app``: a flag for every setting, then uvicorn."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from types import FrameType
from typing import cast

import uvicorn
from fastapi import FastAPI

from app.api.deps import AppState
from app.config import Settings, SettingsError, settings_from_args
from app.engine.instant import load_engine
from app.errors import ModelLoadError
from app.http_protocol import ConnectionLimits, guarded_protocol, raise_open_file_limit
from app.logs import configure as configure_logging
from app.main import create_app
from app.trim import fix_mmap_threshold

log = logging.getLogger("dfine")

ROLE_ENV = "DFINE_ROLE"  # engine or frontend: a child of the supervisor (FRONTENDS > 1)
HTTP_FD_ENV = "DFINE_HTTP_FD"


class DrainingServer(uvicorn.Server):
    """On SIGTERM or SIGINT: /readyz turns 503 and new requests get 503 not_ready, the admitted
    requests finish, then uvicorn shuts down, and the process exits with 0. A second signal
    stops at once."""

    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own, this does not re-raise the signal after shutdown, which
        # would end the process with "killed by SIGTERM" instead of exit code 0.
        if self._draining:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        self.state.draining = True
        log.info("draining: refusing new requests, finishing admitted ones")
        if self.state.streams is not None:
            # First: their readers' event and preview responses end (with an `end` event),
            # which uvicorn would otherwise wait for without end.
            await self.state.streams.stop()
        await self.state.registry.drain(self.drain_timeout_s)
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from app.bench.cli import main as bench  # only the tools need their modules

        bench(argv[1:])
        return
    if argv[:1] == ["bench-swap"]:
        from app.bench.swap import main as bench_swap

        bench_swap(argv[1:])
        return
    if argv[:1] == ["bench-streams"]:
        from app.bench.streams import main as bench_streams

        bench_streams(argv[1:])
        return
    if argv[:1] == ["bench-tiling"]:
        from app.bench.tiling import main as bench_tiling

        bench_tiling(argv[1:])
        return
    if argv[:1] == ["eval"]:
        from app.bench.evaluate import main as evaluate

        evaluate(argv[1:])
        return
    if argv[:1] == ["inspect"]:
        from app.inspection import main as inspect

        inspect(argv[1:])
        return
    if argv[:1] == ["quantize"]:  # a model tool: needs the [models] extra's packages
        from models.quantize import main as quantize

        quantize(argv[1:])
        return
    try:
        settings = settings_from_args(argv)
    except SettingsError as exc:
        print(f"dfine-serve: error: {exc}", file=sys.stderr)
        sys.exit(2)
    frontends = resolve_frontends(settings)
    role = os.environ.get(ROLE_ENV)
    supervisor = role is None and frontends > 1
    # The supervisor forks its children from a process without threads.
    configure_logging(settings.log_level, settings.log_format, writer_thread=not supervisor)
    fix_mmap_threshold()  # before any model is loaded (app/trim.py says why)
    if role == "frontend":
        serve_frontend(settings.model_copy(update={"frontends": frontends}))
        return
    if supervisor:
        from app.supervisor import run as supervise

        os.environ["DFINE_FRONTENDS"] = str(frontends)  # the children's, resolved once
        os.environ["DFINE_SUPERVISOR_PID"] = str(os.getpid())  # their metrics: app.metrics
        sys.exit(supervise(settings.model_copy(update={"frontends": frontends}), argv))
    engine = None
    if settings.model_repository is None:
        try:
            engine = load_engine(settings)  # fail fast, before binding the port
        except ModelLoadError as exc:
            print(f"dfine-serve: error: {exc}", file=sys.stderr)
            sys.exit(2)
    elif not settings.model_repository.is_dir():
        print(f"dfine-serve: error: model repository {settings.model_repository} is not a "
              f"directory", file=sys.stderr)
        sys.exit(2)
    if role == "engine":
        from app.engine_process import main as serve_engine

        serve_engine(settings.model_copy(update={"frontends": frontends}), engine)
        return
    app = create_app(settings, engine=engine)
    server = DrainingServer(server_config(app, settings), app.state.dfine,
                            drain_timeout_s=settings.request_timeout_s + 5)
    server.run()


def resolve_frontends(settings: Settings) -> int:
    """FRONTENDS, with 0 (auto) resolved: 1 when the engine runs on the CPU (it needs the
    cores: front ends would only take them), else one per 4 cores, 2 to 8."""
    if settings.frontends:
        return settings.frontends
    import onnxruntime as ort

    from app.engine.providers import CPU, choose_providers

    try:
        providers = choose_providers(settings.provider_list, ort.get_available_providers())
    except ModelLoadError:
        return 1
    if providers[:1] == [CPU]:
        return 1
    return max(2, min(8, (os.cpu_count() or 1) // 4))


def serve_frontend(settings: Settings) -> None:
    """A front end of FRONTENDS > 1: the HTTP and gRPC service on the supervisor's listening
    socket, its models those of the engine process (app.frontend)."""
    from app.api.forward import STREAMS_SOCKET_NAME
    from app.engine_process import socket_path
    from app.frontend import FRONTEND_INDEX_ENV, EngineLink, RemoteRegistry

    index = int(os.environ.get(FRONTEND_INDEX_ENV, "0"))
    link = EngineLink(str(socket_path()), index)
    # Front end 0 runs the streams (app.streams); the others hand /streams to it over a Unix
    # socket beside the engine's (app.api.forward).
    streams_socket = socket_path().parent / STREAMS_SOCKET_NAME
    app = create_app(settings, registry=lambda metrics: RemoteRegistry(
        settings, metrics, link, settings.frontends),
        forward_streams_to=streams_socket if index else None)
    state = app.state.dfine  # run-time log and trace settings: the service's, via the engine
    cast(RemoteRegistry, state.registry).share_settings(state.tracing)
    sockets = [socket.socket(fileno=int(os.environ[HTTP_FD_ENV]))]
    if index == 0:
        streams_socket.unlink(missing_ok=True)  # a front end 0 that died left it
        sockets.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sockets[-1].bind(str(streams_socket))
        sockets[-1].listen(64)
    server = DrainingServer(server_config(app, settings), app.state.dfine,
                            drain_timeout_s=settings.request_timeout_s + 5)
    server.run(sockets=sockets)


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn with the connection limits of app/http_protocol.py, no Server header, and no
    access log of its own (the service writes one with request ids and batch sizes)."""
    errors = app.state.dfine.metrics.errors
    limits = ConnectionLimits.from_settings(settings)
    raise_open_file_limit(settings.max_connections
                          + (settings.grpc_max_connections if settings.grpc_port else 0))
    protocol = guarded_protocol(limits, lambda code: errors.labels(code=code).inc())
    return uvicorn.Config(app, host=settings.host, port=settings.port,
                          log_level=settings.log_level, timeout_graceful_shutdown=None,
                          access_log=False, log_config=None, server_header=False, http=protocol,
                          # A client's frame is one message (app.streams.client).
                          ws_max_size=settings.stream_max_frame_bytes)


if __name__ == "__main__":
    main()
