"""``FRONTENDS=N`` (N > 1): ``python -m app`` becomes this supervisor. It owns the HTTP listening
socket and a private runtime directory, starts one engine process and N front ends (fresh
interpreters, ``subprocess.Popen``), replaces a front end or restarts the engine that exits when
not asked to, gives up (exits non-zero, for the orchestrator to restart the pod) on a crash loop,
and on SIGTERM or SIGINT stops the front ends first (each drains), then the engine.

The children's contract (environment):

- every child: ``DFINE_ROLE`` (``engine`` or ``frontend``), ``DFINE_RUNTIME_DIR`` (mode 0700;
  the engine creates ``engine.sock`` in it), ``PROMETHEUS_MULTIPROC_DIR`` (its ``metrics/``);
- a front end: ``DFINE_FRONTEND_INDEX`` (0..N-1, kept by its replacement) and ``DFINE_HTTP_FD``,
  the inherited listening socket: one accept queue that every front end's event loop takes
  connections from.

Each child runs in a process group of its own, so that a terminal's Ctrl-C reaches only the
supervisor, which forwards it in order; each gets SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from prometheus_client import multiprocess

from app.config import Settings

log = logging.getLogger("dfine.supervisor")

Role = Literal["engine", "frontend"]

ENGINE_SOCKET_NAME = "engine.sock"
METRICS_DIR_NAME = "metrics"
# A Unix socket's path must fit sockaddr_un.sun_path (108 bytes with its terminating NUL).
MAX_UNIX_SOCKET_PATH = 107
HTTP_BACKLOG = 2048  # uvicorn's default; each front end's uvicorn listens with its own again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A child that exits with this status found its configuration wrong (as `dfine-serve` exits 2
# on a bad setting or a model that will not load): restarting it cannot help.
CONFIGURATION_ERROR_STATUS = 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Child:
    """One supervised place: the engine, or front end ``index``; its process changes on restart."""

    role: Role
    index: int | None
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None  # time.monotonic() of a scheduled restart
    exits: deque[float] = field(default_factory=deque)  # recent unasked-for exits
    starts: int = 0

    @property
    def name(self) -> str:
        return "engine" if self.index is None else f"frontend {self.index}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


@dataclass(frozen=True)
class RestartPolicy:
    """A child that exits when not asked to is started again after ``backoff_s``, doubled for
    each earlier exit within ``window_s`` (at most ``max_backoff_s``); the ``crash_limit``-th
    exit within ``window_s`` makes the supervisor give up."""

    backoff_s: float = 0.5
    max_backoff_s: float = 5.0
    crash_limit: int = 5
    window_s: float = 60.0

    def delay_s(self, recent_exits: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, recent_exits - 1)))


class RuntimeDirError(RuntimeError):
    pass


class Supervisor:
    """Starts, watches and stops the engine process and ``frontends`` front ends.

    ``engine_command`` and ``frontend_command`` are the children's command lines (the service
    runs ``python -m app <argv>`` for both; tests run stand-ins)."""

    def __init__(self, *, engine_command: list[str], frontend_command: list[str],
                 frontends: int, host: str, port: int, drain_timeout_s: float,
                 engine_stop_timeout_s: float = 30.0,
                 restart_policy: RestartPolicy | None = None,
                 environment: Mapping[str, str] | None = None) -> None:
        if frontends < 1:
            raise ValueError(f"frontends must be at least 1, not {frontends}")
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self.engine_stop_timeout_s = engine_stop_timeout_s
        self.restart_policy = restart_policy or RestartPolicy()
        self.environment = dict(os.environ if environment is None else environment)
        self.engine = Child("engine", None, engine_command)
        self.frontends = [Child("frontend", i, frontend_command) for i in range(frontends)]
        self.runtime_dir: Path | None = None
        self.listener: socket.socket | None = None
        self.exit_status: int | None = None  # set when the supervisor decides to stop
        self._signals: deque[int] = deque()  # received by the handler, handled by the loop
        self._wakeup_read = -1

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (exit status 0) or a child's crash loop (1, or 2 for
        a configuration error); always stops every child and removes the runtime directory."""
        with self._signal_handling():
            try:
                self.runtime_dir = make_runtime_dir()
                self.listener = listen_http(self.host, self.port)
            except (OSError, RuntimeDirError) as exc:
                log.error("cannot start: %s", exc)
                self._remove_runtime_dir()
                return 1
            try:
                self._start_all()
                self._supervise()
                self._stop_all()
            finally:
                if self.exit_status is None:  # an unexpected error ended the loop
                    self.exit_status = 1
                self._kill_leftovers()
                self._close_listener()
                self._remove_runtime_dir()
        status = 1 if self.exit_status is None else self.exit_status
        log.info("supervisor done, exit status %d", status)
        return status

    def _start_all(self) -> None:
        assert self.runtime_dir is not None and self.listener is not None
        host, port = self.listener.getsockname()[:2]
        log.info("supervisor %d: listening on http://%s:%d (shared by %d front ends), runtime "
                 "directory %s", os.getpid(), url_host(host), port, len(self.frontends),
                 self.runtime_dir)
        for child in self._children():
            if self.exit_status is None:  # else one could not be started: no point going on
                self._start(child)

    def _supervise(self) -> None:
        """The main loop: wake on a signal or when a restart is due, reap, restart."""
        while self.exit_status is None:
            self._wait_for_event(self._seconds_to_next_restart())
            self._handle_signals()
            self._reap()
            self._restart_due()

    def _stop_all(self) -> None:
        """Front ends first (each drains its admitted requests), then the engine."""
        live = [c for c in self.frontends if c.process is not None]
        log.info("draining: SIGTERM to %d front ends (pids %s), waiting up to %.0f s",
                 len(live), pids_text(live), self.drain_timeout_s)
        self._close_listener()  # the front ends hold their own copies until they stop
        self._stop(live, self.drain_timeout_s)
        log.info("front ends stopped")
        if self.engine.process is not None:
            log.info("SIGTERM to the engine (pid %d), waiting up to %.0f s", self.engine.pid,
                     self.engine_stop_timeout_s)
            self._stop([self.engine], self.engine_stop_timeout_s)
            log.info("engine stopped")

    # -- children ------------------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        assert self.runtime_dir is not None and self.listener is not None
        http_fd = self.listener.fileno() if child.role == "frontend" else None
        environment = child_environment(self.environment, self.runtime_dir, child.role,
                                        child.index, http_fd)
        child.restart_at = None
        child.starts += 1
        try:
            child.process = spawn(child.command, environment,
                                  () if http_fd is None else (http_fd,))
        except OSError as exc:
            log.error("%s: cannot start %s: %s; stopping the service", child.name,
                      child.command[0], exc)
            self.exit_status = 1
            return
        log.info("%s %s: pid %d", child.name, "started" if child.starts == 1 else "restarted",
                 child.pid)

    def _reap(self) -> None:
        for child in self._children():
            if child.process is not None and child.process.poll() is not None:
                self._on_exit(child)

    def _on_exit(self, child: Child) -> None:
        assert child.process is not None and self.runtime_dir is not None
        pid, status = child.process.pid, child.process.returncode
        child.process = None
        log_exit = log.info if self.exit_status is not None else log.warning
        log_exit("%s (pid %d) %s", child.name, pid, exit_text(status))
        # its live gauges leave the sum (prometheus_client has no type hints)
        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            pid, str(self.runtime_dir / METRICS_DIR_NAME))
        if child.role == "engine":  # a stale socket file: the front ends see it gone at once
            with contextlib.suppress(FileNotFoundError):
                (self.runtime_dir / ENGINE_SOCKET_NAME).unlink()
        if self.exit_status is None:
            self._schedule_restart(child, status)

    def _schedule_restart(self, child: Child, status: int) -> None:
        now = time.monotonic()
        policy = self.restart_policy
        child.exits.append(now)
        while child.exits and now - child.exits[0] > policy.window_s:
            child.exits.popleft()
        if status == CONFIGURATION_ERROR_STATUS:
            log.error("%s exited with status %d (a configuration error): not restarting it; "
                      "stopping the service", child.name, status)
            self.exit_status = CONFIGURATION_ERROR_STATUS
        elif len(child.exits) >= policy.crash_limit:
            log.error("%s exited %d times within %.0f s: giving up, stopping the service",
                      child.name, len(child.exits), policy.window_s)
            self.exit_status = 1
        else:
            delay_s = policy.delay_s(len(child.exits))
            child.restart_at = now + delay_s
            log.info("%s: restarting in %.2f s", child.name, delay_s)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self._children():
            if self.exit_status is None and child.restart_at is not None \
                    and now >= child.restart_at:
                self._start(child)

    def _stop(self, children: list[Child], timeout_s: float) -> None:
        """SIGTERM to ``children``, wait for them; SIGKILL to those still there after
        ``timeout_s``."""
        for child in children:
            if child.process is not None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self._wait_for(children, deadline):
            pass
        stubborn = [c for c in children if c.process is not None]
        if stubborn:
            log.warning("SIGKILL to %s (pids %s): not stopped after %.0f s",
                        ", ".join(c.name for c in stubborn), pids_text(stubborn), timeout_s)
            for child in stubborn:
                assert child.process is not None
                child.process.kill()
                child.process.wait()
                self._on_exit(child)

    def _wait_for(self, children: list[Child], deadline: float) -> bool:
        """One turn of waiting while stopping; False once all of ``children`` have exited or
        the deadline has passed."""
        self._reap()
        remaining_s = deadline - time.monotonic()
        if all(c.process is None for c in children) or remaining_s <= 0:
            return False
        self._wait_for_event(remaining_s)
        self._handle_signals()
        return True

    def _kill_leftovers(self) -> None:
        """Only on an unexpected error: no child may outlive the supervisor."""
        for child in self._children():
            if child.process is not None:
                log.error("%s (pid %d) still running: SIGKILL", child.name, child.pid)
                child.process.kill()
                child.process.wait()
                self._on_exit(child)

    def _children(self) -> list[Child]:
        return [self.engine, *self.frontends]

    def _seconds_to_next_restart(self) -> float:
        due = [c.restart_at for c in self._children() if c.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 1.0

    # -- signals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signal_handling(self) -> Iterator[None]:
        """The handlers only note the signal and write to a pipe that wakes the loop (via
        ``signal.set_wakeup_fd``): nothing is done inside a handler, and a SIGCHLD that comes
        just before the loop waits still wakes it."""
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watched = (*STOP_SIGNALS, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._note_signal) for sig in watched}
        self._wakeup_read = read_fd
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(read_fd)
            os.close(write_fd)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _wait_for_event(self, timeout_s: float) -> None:
        """Sleep until a signal arrives or ``timeout_s`` passes (at most a second: reaping by
        polling too, should a wakeup ever be missed)."""
        with contextlib.suppress(InterruptedError):
            select.select([self._wakeup_read], [], [], min(timeout_s, 1.0))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wakeup_read, 512):
                pass

    def _handle_signals(self) -> None:
        while self._signals:
            name = signal.Signals(self._signals.popleft()).name
            if self.exit_status is None:
                log.info("%s received: stopping", name)
                self.exit_status = 0
            else:  # the stop under way is bounded by its timeouts; a signal does not hurry it
                log.info("%s received: already stopping", name)

    # -- the listening socket and the runtime directory ------------------------------------

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _remove_runtime_dir(self) -> None:
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None


def make_runtime_dir() -> Path:
    """A private directory (mode 0700) for the engine's socket and the metric files."""
    path = Path(tempfile.mkdtemp(prefix="dfine-"))
    (path / METRICS_DIR_NAME).mkdir(mode=0o700)
    socket_path = path / ENGINE_SOCKET_NAME
    if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
        shutil.rmtree(path, ignore_errors=True)
        raise RuntimeDirError(f"{socket_path} is too long for a Unix socket: set TMPDIR to a "
                              f"shorter directory")
    return path


def listen_http(host: str, port: int) -> socket.socket:
    """The HTTP listening socket every front end inherits (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(HTTP_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def child_environment(base: Mapping[str, str], runtime_dir: Path, role: Role,
                      index: int | None, http_fd: int | None) -> dict[str, str]:
    environment = dict(base)
    environment.update({
        "DFINE_ROLE": role,
        "DFINE_RUNTIME_DIR": str(runtime_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(runtime_dir / METRICS_DIR_NAME),
    })
    for name in ("DFINE_FRONTEND_INDEX", "DFINE_HTTP_FD"):
        environment.pop(name, None)
    if index is not None:
        environment["DFINE_FRONTEND_INDEX"] = str(index)
    if http_fd is not None:
        environment["DFINE_HTTP_FD"] = str(http_fd)
    return environment


def spawn(command: list[str], environment: Mapping[str, str],
          pass_fds: Iterable[int]) -> subprocess.Popen[bytes]:
    """A child in a process group of its own, told SIGTERM should the supervisor die."""
    return subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL,
                            pass_fds=tuple(pass_fds), process_group=0,
                            preexec_fn=terminate_with_parent(os.getpid()))


def terminate_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """Runs in the child between fork and exec (the supervisor has no threads, so this is
    safe): the kernel sends it SIGTERM when the supervisor dies. None where not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: nothing is imported after fork

    def arrange() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
            os._exit(1)

    return arrange


def exit_text(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def pids_text(children: Iterable[Child]) -> str:
    return ", ".join(str(c.pid) for c in children) or "none"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def frontend_count(settings: Settings) -> int:
    """FRONTENDS, which the caller has resolved: 0 (auto) is refused here, not guessed."""
    if settings.frontends < 1:
        raise ValueError("FRONTENDS must be resolved (auto turned into a number) before the "
                         "supervisor starts")
    return settings.frontends


def run(settings: Settings, argv: list[str]) -> int:
    """``python -m app <argv>`` with FRONTENDS > 1 (``settings.frontends``, resolved): supervise
    an engine process and the front ends, each ``python -m app <argv>`` again (``DFINE_ROLE``
    tells them apart). Call it before any thread is started (the children are forked with a
    pre-exec step)."""
    command = [sys.executable, "-m", "app", *argv]
    supervisor = Supervisor(engine_command=command, frontend_command=command,
                            frontends=frontend_count(settings), host=settings.host,
                            port=settings.port,
                            # A front end's drain (REQUEST_TIMEOUT_S + 5), its lifespan's
                            # (at most REQUEST_TIMEOUT_S more) and gRPC's grace (5 s).
                            drain_timeout_s=2 * settings.request_timeout_s + 15)
    return supervisor.run()


