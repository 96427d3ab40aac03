"""Stand-ins for the supervisor's children, and the supervisor run over them, for
tests/integration/test_supervisor.py: ``python -m tests.integration.supervised_child ROLE``.

- ``supervisor [options]``: app.supervisor.Supervisor over the stand-ins below, on a free
  loopback port (the log says which);
- ``engine``: creates and listens on ``$DFINE_RUNTIME_DIR/engine.sock`` and answers each
  connection with its pid, nothing else; exits 0 on SIGTERM;
- ``frontend``: uvicorn on the inherited socket (``DFINE_HTTP_FD``) answering its pid, index and
  runtime directory as JSON; ``/slow?seconds=S`` answers after S seconds, ``/block?seconds=S``
  too but blocks its event loop meanwhile; on SIGTERM it finishes the requests in flight and
  exits 0. A live-sum gauge and a counter in prometheus_client's
  multiprocess files;
- ``stubborn``: a front end that ignores SIGTERM;
- ``crash STATUS``: exits with STATUS at once.

Each child appends "<role> <index> <pid> <event>" lines to ``$STAND_IN_EVENTS`` (when set), so
a test sees the order things happened in across processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs

MODULE = "tests.integration.supervised_child"


def record(role: str, event: str) -> None:
    """One line, written at once with O_APPEND: lines from several processes never mix."""
    path = os.environ.get("STAND_IN_EVENTS")
    if not path:
        return
    index = os.environ.get("DFINE_FRONTEND_INDEX", "-")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{role} {index} {os.getpid()} {event}\n".encode())
    finally:
        os.close(fd)


def engine() -> None:
    record("engine", "start")
    path = Path(os.environ["DFINE_RUNTIME_DIR"]) / "engine.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    def stop(signum: int, frame: FrameType | None) -> None:
        record("engine", "sigterm")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        while True:
            connection, _ = server.accept()
            with connection:
                connection.sendall(f"{os.getpid()}\n".encode())


async def answer_pid(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The front end's whole app (plain ASGI)."""
    import asyncio

    if scope["type"] != "http":
        return
    query = parse_qs(scope["query_string"].decode())
    seconds = float(query.get("seconds", ["2"])[0])
    if scope["path"] == "/slow":  # in flight, the event loop free
        record("frontend", "slow-start")
        await asyncio.sleep(seconds)
    elif scope["path"] == "/block":  # the whole process busy: it accepts nothing meanwhile
        record("frontend", "block-start")
        time.sleep(seconds)
    body = json.dumps({"pid": os.getpid(), "index": int(os.environ["DFINE_FRONTEND_INDEX"]),
                       "runtime_dir": os.environ["DFINE_RUNTIME_DIR"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def frontend(ignore_sigterm: bool) -> None:
    import uvicorn
    from prometheus_client import Counter, Gauge  # multiprocess: PROMETHEUS_MULTIPROC_DIR

    Gauge("stand_in_up", "front ends up", multiprocess_mode="livesum").set(1)
    Counter("stand_in_starts", "front ends started").inc()

    class StandInServer(uvicorn.Server):
        # uvicorn's own handler re-raises the signal after shutdown (exit "killed by SIGTERM");
        # the service's front end exits 0, and so does this one.
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not ignore_sigterm:
                self.should_exit = True

    listener = socket.socket(fileno=int(os.environ["DFINE_HTTP_FD"]))
    config = uvicorn.Config(answer_pid, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=None)
    record("frontend", "start")
    StandInServer(config).run(sockets=[listener])
    record("frontend", "exit")


def supervise(argv: list[str]) -> int:
    from app.supervisor import RestartPolicy, Supervisor

    parser = argparse.ArgumentParser()
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--frontend", default="frontend", help="frontend, stubborn or crash")
    parser.add_argument("--crash-status", type=int, default=3)
    parser.add_argument("--drain-timeout-s", type=float, default=20.0)
    parser.add_argument("--backoff-s", type=float, default=0.1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    child = [sys.executable, "-m", MODULE]
    frontend_command = [*child, args.frontend]
    if args.frontend == "crash":
        frontend_command.append(str(args.crash_status))
    supervisor = Supervisor(
        engine_command=[*child, "engine"], frontend_command=frontend_command,
        frontends=args.frontends, host="127.0.0.1", port=0,
        drain_timeout_s=args.drain_timeout_s, engine_stop_timeout_s=10.0,
        restart_policy=RestartPolicy(backoff_s=args.backoff_s, max_backoff_s=1.0))
    return supervisor.run()


def main(argv: list[str]) -> int:
    role, rest = argv[0], argv[1:]
    if role == "supervisor":
        return supervise(rest)
    if role == "engine":
        engine()
    elif role in ("frontend", "stubborn"):
        frontend(ignore_sigterm=role == "stubborn")
    elif role == "crash":
        record("frontend", "crash")
        return int(rest[0])
    else:
        raise SystemExit(f"unknown role {role}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
