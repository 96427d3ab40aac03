"""The supervisor of FRONTENDS=N (app/supervisor.py): real processes, real signals, real HTTP.

The supervisor runs in a subprocess over stand-in children (tests/integration/
supervised_child.py: an engine that only listens on its socket, front ends that answer their
pid with uvicorn on the inherited socket), so that what is tested is the supervision itself:
the shared port, replacing and restarting, the order of a drain, giving up on a crash loop,
and the metric files of the dead."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, wait_until
from tests.integration.supervised_child import MODULE

LISTENING = re.compile(r"listening on (http://[\d.]+:\d+) .*runtime directory (\S+)")


@dataclass(frozen=True)
class Event:
    role: str
    index: str
    pid: int
    what: str


@dataclass
class Supervised:
    process: subprocess.Popen[bytes]
    log_path: Path
    events_path: Path
    url: str = ""  # these two from the supervisor's first log line
    runtime_dir: Path = Path("/nonexistent")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[Event]:
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text().splitlines()
        return [Event(role, index, int(pid), what)
                for role, index, pid, what in (line.split() for line in lines)]

    def pids(self, role: str, what: str) -> list[int]:
        return [e.pid for e in self.events() if e.role == role and e.what == what]

    def answer(self, path: str = "/", timeout_s: float = 10) -> dict[str, Any]:
        """One request on a connection of its own (any front end may accept it)."""
        response = httpx.get(f"{self.url}{path}", timeout=timeout_s)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout_s} s:\n"
                                 f"{self.log()}") from None


def start_supervisor(tmp_path: Path, *args: str) -> Supervised:
    log_path, events_path = tmp_path / "supervisor.log", tmp_path / "events.log"
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("DFINE_", "PROMETHEUS_MULTIPROC"))}
    environment["STAND_IN_EVENTS"] = str(events_path)
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", MODULE, "supervisor", *args],
                                   cwd=ROOT, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT)
    return Supervised(process, log_path, events_path)


def wait_listening(supervised: Supervised) -> None:
    def listening() -> re.Match[str] | None:
        if supervised.process.poll() is not None:
            raise AssertionError(f"supervisor exited with {supervised.process.returncode}:\n"
                                 f"{supervised.log()}")
        return LISTENING.search(supervised.log())

    found = wait_until(listening, 30, "the supervisor's listening line")
    assert found is not None
    supervised.url, supervised.runtime_dir = found[1], Path(found[2])


def stop_everything(supervised: Supervised) -> None:
    """After a test, pass or fail: the supervisor, then any stand-in it left (by pid, and only
    a process that is one of this module's stand-ins)."""
    if supervised.process.poll() is None:
        supervised.process.send_signal(signal.SIGTERM)
        try:
            supervised.process.wait(30)
        except subprocess.TimeoutExpired:
            supervised.process.kill()
            supervised.process.wait()
    for pid in {e.pid for e in supervised.events()}:
        with contextlib.suppress(OSError):
            if MODULE in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.kill(pid, signal.SIGKILL)
    if supervised.runtime_dir.name.startswith("dfine-"):  # left only by a killed supervisor
        shutil.rmtree(supervised.runtime_dir, ignore_errors=True)


@contextlib.contextmanager
def supervisor(tmp_path: Path, *args: str) -> Iterator[Supervised]:
    """A supervisor over the stand-ins, listening (its front ends may still be starting)."""
    supervised = start_supervisor(tmp_path, *args)
    try:
        wait_listening(supervised)
        yield supervised
    finally:
        stop_everything(supervised)


def answers_of_two_frontends(supervised: Supervised) -> list[dict[str, Any]]:
    """Two answers from two different front ends if both accept: one front end is kept busy
    (its event loop blocked) while a second request comes, so another one must accept it.
    Fewer or equal answers while a front end is not up yet."""
    blocks_before = len(supervised.pids("frontend", "block-start"))
    answers: list[dict[str, Any]] = []

    def blocked_request() -> None:
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            answers.append(supervised.answer("/block?seconds=0.5"))

    thread = threading.Thread(target=blocked_request)
    thread.start()
    try:
        wait_until(lambda: len(supervised.pids("frontend", "block-start")) > blocks_before, 15,
                   "a front end blocked")
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            answers.append(supervised.answer())
    finally:
        thread.join(30)
    return answers


def frontend_pids(supervised: Supervised, count: int = 2, timeout_s: float = 30
                  ) -> dict[int, int]:
    """Index to pid of ``count`` front ends, each seen answering over the shared port."""
    seen: dict[int, int] = {}

    def all_seen() -> dict[int, int]:
        seen.update((a["index"], a["pid"]) for a in answers_of_two_frontends(supervised))
        return dict(seen) if len(seen) >= count else {}

    return wait_until(all_seen, timeout_s, f"{count} front ends answering")


def engine_pid(runtime_dir: Path) -> int | None:
    """The pid the engine stand-in answers on its socket; None while there is none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(str(runtime_dir / "engine.sock"))
            return int(connection.makefile().readline())
    except (OSError, ValueError):
        return None


def running_engine(runtime_dir: Path, other_than: int | None = None) -> int:
    """The engine's pid once one (other than ``other_than``) answers on the socket."""

    def answering() -> int | None:
        pid = engine_pid(runtime_dir)
        return None if pid == other_than else pid

    pid = wait_until(answering, 30, "an engine answering on its socket")
    assert pid is not None
    return pid


def reaped(pid: int) -> bool:
    """Gone for good: not even a zombie, so its parent (the supervisor) has waited for it."""
    return not Path(f"/proc/{pid}").exists()


def ended(pid: int) -> bool:
    """Not running: gone, or a zombie (reparented, it waits for whoever reaps orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_frontends_share_one_port_and_a_private_runtime_dir(tmp_path: Path) -> None:
    with supervisor(tmp_path, "--frontends", "2") as supervised:
        pids = frontend_pids(supervised)
        assert set(pids) == {0, 1}
        assert len(set(pids.values())) == 2
        assert stat.S_IMODE(supervised.runtime_dir.stat().st_mode) == 0o700
        assert (supervised.runtime_dir / "metrics").is_dir()
        engine = running_engine(supervised.runtime_dir)
        assert engine == supervised.pids("engine", "start")[-1]
        assert engine not in pids.values()


def test_killed_frontend_is_replaced_and_the_port_keeps_answering(tmp_path: Path) -> None:
    with supervisor(tmp_path, "--frontends", "2") as supervised:
        before = frontend_pids(supervised)
        victim, survivor = before[0], before[1]
        os.kill(victim, signal.SIGKILL)
        answered_by: set[int] = set()

        def replacement_answers() -> bool:
            # A request may fail at the moment of the kill; every other one is answered.
            with contextlib.suppress(httpx.HTTPError):
                answered_by.add(supervised.answer(timeout_s=5)["pid"])
            with contextlib.suppress(httpx.HTTPError):
                answered_by.update(a["pid"] for a in answers_of_two_frontends(supervised))
            return bool(answered_by - {victim, survivor})

        wait_until(replacement_answers, 30, "the replacement front end answering")
        assert survivor in answered_by
        assert reaped(victim)
        after = frontend_pids(supervised)
        assert after[1] == survivor
        assert after[0] not in (victim, survivor)
        assert f"frontend 0 (pid {victim}) was killed by SIGKILL" in supervised.log()
        assert f"frontend 0 restarted: pid {after[0]}" in supervised.log()


def test_dead_frontend_metric_files_are_marked_dead(tmp_path: Path) -> None:
    with supervisor(tmp_path, "--frontends", "2") as supervised:
        victim = frontend_pids(supervised)[0]
        metrics = supervised.runtime_dir / "metrics"
        live_gauge = metrics / f"gauge_livesum_{victim}.db"
        counter = metrics / f"counter_{victim}.db"
        assert live_gauge.exists() and counter.exists()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not live_gauge.exists(), 30, "the dead front end's live gauge gone")
        assert counter.exists()  # a counter's count stays in the sum: only live gauges go
        replacement = wait_until(lambda: {victim} ^ {frontend_pids(supervised)[0]}, 30,
                                 "the replacement answering") - {victim}
        assert (metrics / f"gauge_livesum_{replacement.pop()}.db").exists()


def test_killed_engine_is_restarted_and_the_frontends_stay(tmp_path: Path) -> None:
    with supervisor(tmp_path, "--frontends", "2") as supervised:
        frontends = frontend_pids(supervised)
        first = running_engine(supervised.runtime_dir)
        os.kill(first, signal.SIGKILL)
        second = running_engine(supervised.runtime_dir, other_than=first)
        assert reaped(first)
        assert supervised.pids("engine", "start")[-1] == second
        assert frontend_pids(supervised) == frontends  # the front ends were not touched
        assert f"engine restarted: pid {second}" in supervised.log()


def test_sigterm_drains_the_frontends_before_the_engine(tmp_path: Path) -> None:
    with supervisor(tmp_path, "--frontends", "2") as supervised:
        frontend_pids(supervised)
        slow: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: slow.append(
            httpx.get(f"{supervised.url}/slow?seconds=2", timeout=30)))
        thread.start()
        wait_until(lambda: supervised.pids("frontend", "slow-start"), 15, "the slow request")
        supervised.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining" in supervised.log(), 15, "the drain")
        supervised.process.send_signal(signal.SIGTERM)  # a second one must not cut it short
        thread.join(30)
        assert supervised.wait_exit(30) == 0
        assert slow and slow[0].status_code == 200
        assert "already stopping" in supervised.log()
        whats = [(e.role, e.what) for e in supervised.events()]
        engine_told = whats.index(("engine", "sigterm"))
        frontend_exits = [i for i, w in enumerate(whats) if w == ("frontend", "exit")]
        assert len(frontend_exits) == 2
        assert max(frontend_exits) < engine_told
        assert not supervised.runtime_dir.exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(supervised.url, timeout=5)


def test_frontend_ignoring_sigterm_is_killed_after_the_drain_timeout(tmp_path: Path) -> None:
    with supervisor(tmp_path, "--frontends", "2", "--frontend", "stubborn",
                    "--drain-timeout-s", "1") as supervised:
        pids = frontend_pids(supervised)
        supervised.process.send_signal(signal.SIGTERM)
        assert supervised.wait_exit(30) == 0
        assert all(reaped(pid) for pid in pids.values())
        assert "SIGKILL to frontend 0, frontend 1" in supervised.log()
        assert supervised.pids("engine", "sigterm")  # then the engine, in order
        assert not supervised.runtime_dir.exists()


@pytest.mark.parametrize(("crash_status", "supervisor_status", "starts"),
                         [(3, 1, 5), (2, 2, 1)], ids=["crash-loop", "configuration-error"])
def test_crashing_frontend_stops_the_supervisor(tmp_path: Path, crash_status: int,
                                                supervisor_status: int, starts: int) -> None:
    """A front end that exits at once, again and again, makes the supervisor give up with 1 on
    its fifth exit; one that exits with 2 (a configuration error) at its first exit, with 2."""
    with supervisor(tmp_path, "--frontends", "2", "--frontend", "crash", "--crash-status",
                    str(crash_status), "--backoff-s", "0.05") as supervised:
        assert supervised.wait_exit(30) == supervisor_status
        crashes = [e.index for e in supervised.events() if e.what == "crash"]
        assert max(crashes.count(i) for i in ("0", "1")) == starts
        engine = re.search(r"engine started: pid (\d+)", supervised.log())
        assert engine is not None and reaped(int(engine[1]))
        assert not supervised.runtime_dir.exists()


def test_children_end_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no say: the kernel tells its children (PR_SET_PDEATHSIG),
    so that no front end keeps serving the port alone."""
    with supervisor(tmp_path, "--frontends", "2") as supervised:
        children = [*frontend_pids(supervised).values(), running_engine(supervised.runtime_dir)]
        supervised.process.kill()
        supervised.process.wait()
        wait_until(lambda: all(ended(pid) for pid in children), 30, "the children ended")
