"""/metrics across processes (FRONTENDS > 1): real processes, each with PROMETHEUS_MULTIPROC_DIR
set, write their series as a front end and the engine do; a front end's exposition must be one
view of them all: counters and histograms summed, the engine's gauges and model info, and the
process metrics of the whole process tree.

Run as ``python -m tests.integration.test_metrics_multiprocess frontend|engine``, this module is
one such process, which does what the test asks on its stdin, one line at a time.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Metrics, VersionMetrics
from app.metrics_view import service_pids

ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = "tests.integration.test_metrics_multiprocess"
ENGINE_GAUGES = ("dfine_queue_depth", "dfine_queue_capacity", "dfine_inflight_batches",
                 "dfine_model_info")
DETECT = {"endpoint": "/detect", "status": "200", "model": "shapes", "version": "1"}
V1 = {"model": "shapes", "version": "1"}
V2 = {"model": "shapes", "version": "2"}
REQUEST_S, PREPROCESS_S = 0.02, 0.004
HELD_MB = 128
REPLY_TIMEOUT_S = 60.0


# --- the worker processes -------------------------------------------------------------------

class _FrontEnd:
    """Records what a front end records. Two Metrics, as two apps of one process would make:
    their counts must add up, not overwrite each other in the process's files."""

    def __init__(self) -> None:
        self.metrics = [Metrics(), Metrics()]

    def requests(self, count: str) -> None:
        for i in range(int(count)):
            metrics = self.metrics[i % 2]
            metrics.requests.labels(*DETECT.values()).inc()
            metrics.request_duration.labels("/detect", "shapes", "1").observe(REQUEST_S)
            metrics.for_version("shapes", 1).preprocess.observe(PREPROCESS_S)
        self.metrics[0].errors.labels(code="internal").inc()

    def expose(self, path: str) -> None:
        Path(path).write_bytes(self.metrics[0].exposition())


class _Engine:
    """Records what the engine process records: batches, the queue's gauges, model info."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.versions: dict[str, VersionMetrics] = {}
        self.held = bytearray()

    def load(self, version: str) -> None:
        loaded = self.versions[version] = self.metrics.for_version("shapes", int(version))
        loaded.info({"format": "onnx", "layout": "nchw"})
        loaded.queue_capacity.set(64)
        self.metrics.model_event("shapes", int(version), "load")

    def queue(self, version: str, depth: str, inflight: str) -> None:
        self.versions[version].queue_changed(int(depth))
        self.versions[version].inflight_changed(int(inflight))

    def batch(self, version: str, size: str) -> None:
        self.versions[version].batch_started(int(size), [0.01] * int(size))
        self.versions[version].batch_finished(int(size), 0.05, True)

    def info(self, version: str, layout: str) -> None:
        self.versions[version].info({"format": "onnx", "layout": layout})

    def unload(self, version: str) -> None:
        self.versions.pop(version).close()
        self.metrics.model_event("shapes", int(version), "unload")

    def hold(self, megabytes: str) -> None:
        self.held = bytearray(b"\x01") * (int(megabytes) * 1_000_000)  # pages touched: resident

    def expose(self, path: str) -> None:
        Path(path).write_bytes(self.metrics.exposition())


def _serve(role: str) -> None:
    worker = _FrontEnd() if role == "frontend" else _Engine()
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        getattr(worker, command)(*args)
        print("done", flush=True)


# --- the test's side ------------------------------------------------------------------------

class Worker:
    def __init__(self, role: str, metrics_dir: Path) -> None:
        environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                       "DFINE_SUPERVISOR_PID": str(os.getpid()), "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, role], cwd=ROOT, env=environment, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.process.pid
        self._expect("ready")

    def _expect(self, reply: str) -> None:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.process.stdout.readline().strip() if ready else "(no reply in time)"
        if line != reply:
            self.process.kill()
            _, errors = self.process.communicate()
            raise AssertionError(f"worker {self.pid} said {line!r}, not {reply!r}: {errors}")

    def ask(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self._expect("done")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.communicate()


Sample = tuple[str, frozenset[tuple[str, str]]]


class Exposition:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[Sample, float] = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values() for s in family.samples}

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.samples.get((name, frozenset((labels or {}).items())))

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    path = tmp_path / "metrics"
    path.mkdir()
    return path


@pytest.fixture
def start(metrics_dir: Path) -> Iterator[Callable[[str], Worker]]:
    workers: list[Worker] = []

    def started(role: str) -> Worker:
        workers.append(Worker(role, metrics_dir))
        return workers[-1]

    yield started
    for worker in workers:
        worker.stop()


def expose(worker: Worker, tmp_path: Path) -> Exposition:
    path = tmp_path / f"exposition-{time.monotonic_ns()}.txt"
    worker.ask(f"expose {path}")
    return Exposition(path.read_text())


def _proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def rss_bytes(pid: int) -> float:
    return int(_proc_stat(pid)[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu_s(pid: int) -> float:
    fields = _proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_one_view_sums_every_process_and_shows_the_engines_gauges(
        start: Callable[[str], Worker], tmp_path: Path) -> None:
    first, second, engine = start("frontend"), start("frontend"), start("engine")
    for command in ("load 1", "queue 1 3 1", "batch 1 2", f"hold {HELD_MB}"):
        engine.ask(command)
    first.ask("requests 3")
    second.ask("requests 2")
    workers = (first, second, engine)
    cpu_before = sum(cpu_s(w.pid) for w in workers)

    seen = expose(first, tmp_path)

    # counters and histograms: every process's, summed (each front end used two Metrics)
    assert seen.value("dfine_requests_total", DETECT) == 5
    duration = {"endpoint": "/detect", **V1}
    assert seen.value("dfine_request_duration_seconds_count", duration) == 5
    assert seen.value("dfine_request_duration_seconds_sum", duration) == pytest.approx(
        5 * REQUEST_S)
    assert seen.value("dfine_request_duration_seconds_bucket", {**duration, "le": "0.015"}) == 0
    assert seen.value("dfine_request_duration_seconds_bucket", {**duration, "le": "0.025"}) == 5
    assert seen.value("dfine_preprocess_seconds_count", V1) == 5
    assert seen.value("dfine_errors_total", {"code": "internal"}) == 2
    assert seen.value("dfine_errors_total", {"code": "overloaded"}) == 0  # there from the start
    assert seen.value("dfine_images_total", V1) == 2
    assert seen.value("dfine_batch_size_count", V1) == 1
    assert seen.value("dfine_queue_wait_seconds_count", V1) == 2
    assert seen.value("dfine_model_events_total", {**V1, "event": "load"}) == 1
    # the engine's gauges, under the labels one process would give them (no pid)
    assert seen.value("dfine_queue_depth", V1) == 3
    assert seen.value("dfine_inflight_batches", V1) == 1
    assert seen.value("dfine_queue_capacity", V1) == 64
    for name in ENGINE_GAUGES[:3]:
        assert seen.labels_of(name) == [V1], name
    # the model info, as Info gives it in one process
    info = seen.families["dfine_model_info"]
    assert (info.type, info.documentation) == ("gauge", "Each model version being served")
    assert [(s.labels, s.value) for s in info.samples] == [
        ({**V1, "format": "onnx", "layout": "nchw"}, 1.0)]
    # the process metrics: the whole tree under the supervisor (here, this test's process)
    rss = seen.value("process_resident_memory_bytes")
    assert rss is not None and rss >= HELD_MB * 1e6
    assert rss >= 0.9 * sum(rss_bytes(w.pid) for w in workers)
    assert (seen.value("process_cpu_seconds_total") or 0.0) >= cpu_before
    assert (seen.value("process_open_fds") or 0.0) >= 3 * len(workers)  # stdin, out, err
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"):
        assert "Summed over the service's processes" in seen.families[name].documentation


def test_unloaded_version_and_dead_engine_leave_no_gauges(
        start: Callable[[str], Worker], tmp_path: Path, metrics_dir: Path) -> None:
    front_end, engine = start("frontend"), start("engine")
    for command in ("load 1", "load 2", "queue 2 4 1", "batch 2 1", "queue 1 2 0"):
        engine.ask(command)
    front_end.ask("requests 1")
    assert expose(front_end, tmp_path).value("dfine_queue_depth", V2) == 4

    engine.ask("unload 2")
    engine.ask("info 1 nhwc")  # the info replaced: one series, the new one
    seen = expose(front_end, tmp_path)
    for name in ENGINE_GAUGES[:3]:
        assert seen.labels_of(name) == [V1], name
    assert seen.labels_of("dfine_model_info") == [{**V1, "format": "onnx", "layout": "nhwc"}]
    assert seen.value("dfine_images_total", V2) == 1  # counters stay, for rate()

    engine.stop()
    mark_process_dead(engine.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
    seen = expose(front_end, tmp_path)
    for name in ENGINE_GAUGES:
        assert seen.labels_of(name) == [], name
    assert seen.value("dfine_images_total", V2) == 1
    assert seen.value("dfine_requests_total", DETECT) == 1

    restarted = start("engine")
    restarted.ask("load 1")
    seen = expose(front_end, tmp_path)
    assert seen.value("dfine_queue_capacity", V1) == 64
    assert seen.value("dfine_queue_depth", V1) == 0  # with its capacity, as at a load today
    assert len(seen.labels_of("dfine_model_info")) == 1


def test_service_pids_walk_the_process_tree() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys\n"
         "grandchild = subprocess.Popen(['sleep', '600'])\n"
         "print(grandchild.pid, flush=True)\n"
         "sys.stdin.read()\n"
         "grandchild.kill()\n"
         "grandchild.wait()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        assert {child.pid, grandchild} <= set(service_pids(os.getpid()))
        assert service_pids(os.getpid())[0] == os.getpid()
        assert set(service_pids(child.pid)) == {child.pid, grandchild, os.getpid()}
    finally:
        child.communicate("")
    assert grandchild not in service_pids(os.getpid())
    assert service_pids(child.pid) == [os.getpid()]  # a root gone: this process still counts


if __name__ == "__main__":
    _serve(sys.argv[1])
