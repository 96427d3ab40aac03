"""The CPU image, built from the Dockerfile as it is and run as docker-compose.yml runs it
(read-only root, a tmpfs on /tmp, no-new-privileges, the image's own uid), by a real container
engine: Debian's podman here, with the stand-in base of docker/stand-ins.sh; a Docker engine
with its registry where there is one. And the GPU image's dependencies, resolved without
downloading them."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from app.bench.cli import free_port
from tests.containers.conftest import CONFIG
from tests.helpers import ROOT, encode, metric, render_scene, wait_until

IMAGE = "dfine-serve:cpu"
STOP_GRACE_S = 30  # docker-compose.yml's stop_grace_period


class Engine:
    def __init__(self) -> None:
        out = subprocess.run(["bash", "docker/stand-ins.sh", "env"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        self.env = dict(os.environ)
        for line in out.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = shlex.split(value)[0] if value else ""
        self.command = shlex.split(self.env["CONTAINER_ENGINE"])
        self.podman = self.command[0] == "podman"

    def run(self, *args: str, check: bool = True, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command, *args], cwd=ROOT, env=self.env, check=check,
                              capture_output=True, text=True, timeout=timeout)


def report(line: str) -> None:
    """A figure for the test output, shown although pytest captures the rest."""
    capture = CONFIG[0].pluginmanager.getplugin("capturemanager") if CONFIG else None
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n[containers] {line}", flush=True)


def stand_in(engine: Engine, part: str) -> None:
    started = time.monotonic()
    subprocess.run(["bash", "docker/stand-ins.sh", part], cwd=ROOT, env=engine.env,
                   check=True, timeout=600)
    report(f"stand-ins ({part}) ready in {time.monotonic() - started:.0f} s")


def build_cpu_image(engine: Engine) -> str:
    """The CPU image from the Dockerfile as it is (its layers cached by the engine)."""
    stand_in(engine, "base")
    started = time.monotonic()
    formats = ["--format", "docker"] if engine.podman else []  # keeps HEALTHCHECK
    engine.run("build", "-q", *formats, "--network", "host", "--build-arg", "VARIANT=cpu",
               "-t", IMAGE, ".")
    size = engine.run("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
    report(f"built {IMAGE} in {time.monotonic() - started:.0f} s: image size "
           f"{int(size) / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    return build_cpu_image(engine)


@pytest.fixture()
def container(engine: Engine, image: str) -> Iterator[tuple[str, str]]:
    """The image run with compose's options, on free loopback ports (host network)."""
    port = free_port()
    cid = engine.run("run", "-d", "--network", "host", "--read-only", "--tmpfs", "/tmp",
                     "--security-opt", "no-new-privileges", "-e", f"DFINE_PORT={port}",
                     "-e", f"DFINE_GRPC_PORT={free_port()}", "-e", "DFINE_HOST=127.0.0.1",
                     image).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, engine.run("logs", cid, check=False).stderr
            time.sleep(0.3)
        yield cid, url
    finally:
        engine.run("rm", "-f", "-v", cid, check=False)  # -v: its /cache/trt volume too


def test_the_image_serves_as_compose_runs_it(engine: Engine,
                                             container: tuple[str, str]) -> None:
    cid, url = container
    answer = httpx.post(f"{url}/detect", content=encode(render_scene(3)[0]),
                        headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["detections"]
    health = engine.run("healthcheck", "run", cid, check=False) if engine.podman else None
    assert health is None or health.returncode == 0, health
    assert engine.run("exec", cid, "id", "-u").stdout.strip() == "10001"  # not root
    # A read-only root: nothing can be written outside /tmp (and the cache volume).
    denied = engine.run("exec", cid, "sh", "-c", "echo x > /app/x", check=False)
    assert denied.returncode != 0 and "Read-only" in denied.stderr
    assert engine.run("exec", cid, "sh", "-c", "echo x > /tmp/x").returncode == 0
    changed = [line.split()[-1] for line in engine.run("diff", cid).stdout.splitlines()]
    # /etc: hosts and resolv.conf, which the engine itself mounts.
    assert all(p.startswith(("/tmp", "/cache", "/etc")) for p in changed), changed


def test_sigterm_drains_an_inflight_request_within_the_grace_period(
        engine: Engine, container: tuple[str, str]) -> None:
    cid, url = container
    files = [("images", (f"{k}.jpg", encode(render_scene(k)[0]), "image/jpeg"))
             for k in range(12)]
    answers: list[httpx.Response] = []
    sending = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}/detect/batch", files=files, timeout=60)))
    sending.start()
    # Admitted and running (one image a run on a CPU: several runs still to go).
    wait_until(lambda: metric(url, "dfine_images_total") + metric(url, "dfine_queue_depth"),
               60, "the batch's images queued or run")
    started = time.monotonic()
    engine.run("stop", "-t", str(STOP_GRACE_S), cid)
    stopped_in = time.monotonic() - started
    sending.join(60)
    assert answers and answers[0].status_code == 200, answers
    assert all("detections" in r for r in answers[0].json()["results"])
    assert stopped_in < STOP_GRACE_S  # drained, not killed at the end of the grace period
    state = json.loads(engine.run("inspect", cid).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state


def test_the_gpu_images_dependencies_resolve(engine: Engine) -> None:
    """What the Dockerfile installs for VARIANT=gpu, resolved inside the base with
    `pip install --dry-run --report` (no CUDA wheels downloaded): a broken pin or an
    impossible extra fails here, not on a GPU host."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"onnxruntime-gpu[cuda,cudnn]==1.31.1" nvidia-ml-py==13.615.71' in dockerfile
    done = engine.run(
        "run", "--rm", "--network", "host", "-v", f"{ROOT / 'docker'}:/src:ro",
        "docker.io/library/python:3.12-slim-bookworm", "pip", "install", "--quiet",
        "--dry-run", "--ignore-installed", "--report", "-", "-r", "/src/requirements.txt",
        "onnxruntime-gpu[cuda,cudnn]==1.31.1", "nvidia-ml-py==13.615.71", timeout=900)
    resolved = json.loads(done.stdout)
    names = {item["metadata"]["name"].lower() for item in resolved["install"]}
    assert {"onnxruntime-gpu", "nvidia-ml-py", "fastapi", "grpcio"} <= names
    assert any(n.startswith("nvidia-cudnn") for n in names)  # the [cudnn] extra resolved
    # The tracker's packages bring neither a second OpenCV (both own the cv2 module) nor torch.
    assert {"av", "trackers", "supervision"} <= names
    assert not names & {"opencv-python", "torch"}, names
    report(f"GPU image: {len(names)} packages resolve")

