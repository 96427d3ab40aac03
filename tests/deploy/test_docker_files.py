"""Docker and compose files, validated without a Docker engine, and the container's command
run outside Docker."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import compose
import httpx

from tests.deploy.conftest import require
from tests.helpers import ROOT, encode, free_port, render_scene

COMPOSE = os.path.join(os.path.dirname(compose.__file__), "docker-compose")


def test_hadolint_is_clean() -> None:
    result = subprocess.run([require("hadolint"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def compose_config(profile: str) -> dict[str, object]:
    # The wrapper script always exits 0: call the real Compose v2 parser directly.
    result = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "--profile",
                             profile, "config", "--format", "json"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    config: dict[str, object] = json.loads(result.stdout)
    return config


def test_compose_parses_for_each_profile_with_the_right_services() -> None:
    for profile, detector in (("cpu", "detector-cpu"), ("gpu", "detector-gpu")):
        services = compose_config(profile)["services"]
        assert isinstance(services, dict)
        assert set(services) == {detector, "prometheus", "grafana", "alertmanager"}
        spec = services[detector]
        assert spec["networks"]["default"]["aliases"] == ["detector"]
        assert spec["read_only"] is True and "/tmp" in spec["tmpfs"]
        assert spec["healthcheck"]["test"][-1] == "/app/docker/healthcheck.py"
        for name, service in services.items():
            assert "healthcheck" in service, name
            for dependency in service.get("depends_on", {}):
                assert "profiles" not in services[dependency], (name, dependency)
    gpu = compose_config("gpu")["services"]["detector-gpu"]  # type: ignore[index]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert any(v["target"] == "/cache/trt" and v["type"] == "volume" for v in gpu["volumes"])


def test_monitoring_listens_on_this_host_only_and_has_no_default_password() -> None:
    services = compose_config("cpu")["services"]
    assert isinstance(services, dict)
    for name in ("prometheus", "grafana", "alertmanager"):
        assert [p["host_ip"] for p in services[name]["ports"]] == ["127.0.0.1"], name
    assert not any("lifecycle" in arg for arg in services["prometheus"]["command"])
    grafana = services["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    assert grafana["entrypoint"][-1] == "/etc/dfine/grafana-start.sh"


def test_grafana_start_makes_keeps_or_takes_the_admin_password(tmp_path: Path) -> None:
    run = tmp_path / "run.sh"  # stands in for Grafana's own /run.sh: shows what it was given
    run.write_text('#!/bin/sh\necho "started with $GF_SECURITY_ADMIN_PASSWORD"\n')
    run.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "GF_PATHS_DATA": str(tmp_path), "GRAFANA_RUN": str(run)}

    def start(**extra: str) -> str:
        return subprocess.run(["sh", str(ROOT / "docker/grafana/start.sh")], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout

    first = start()
    made = (tmp_path / ".dfine-admin-password").read_text()
    assert len(made) >= 20 and made != "admin" and f"started with {made}" in first
    assert made in first.splitlines()[0]  # printed for the operator
    assert f"started with {made}" in start()  # kept across restarts
    assert "started with s3cret-given" in start(GRAFANA_ADMIN_PASSWORD="s3cret-given")
    assert oct((tmp_path / ".dfine-admin-password").stat().st_mode)[-3:] == "600"


def test_alertmanager_config_is_valid_and_prometheus_sends_it_the_alerts() -> None:
    checked = subprocess.run([require("amtool"), "check-config",
                              str(ROOT / "docker/alertmanager/alertmanager.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "1 receivers" in checked.stdout
    config = (ROOT / "docker/prometheus/prometheus.yml").read_text()
    assert "alertmanager:9093" in config


def dockerfile_runtime() -> tuple[dict[str, str], list[str], list[str]]:
    """ENV, CMD and HEALTHCHECK CMD of the Dockerfile's final stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("FROM "):]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in shlex.split(line[4:])))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", final, re.M).group(1))  # type: ignore[union-attr]
    health = json.loads(re.search(r"HEALTHCHECK .*CMD (\[.*\])", final).group(1))  # type: ignore[union-attr]
    return env, cmd, health


def test_container_command_env_and_healthcheck_work_outside_docker(tmp_path: Path) -> None:
    env, cmd, health = dockerfile_runtime()
    assert cmd == ["python", "-m", "app"]
    # The image's layout, mapped onto the checkout: /app is the repository root.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DFINE_")}
    environment.update({k: v.replace("/app/", f"{ROOT}/") for k, v in env.items()})
    environment["DFINE_TRT_CACHE_DIR"] = str(tmp_path / "trt")
    port = free_port()  # the only change: 8000 may be taken on a shared machine
    environment["DFINE_PORT"] = str(port)
    probe = [sys.executable if health[0] == "python" else health[0],
             *[a.replace("/app/", f"{ROOT}/") for a in health[1:]]]
    assert subprocess.run(probe, env=environment).returncode == 1  # nothing listening yet
    process = subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if subprocess.run(probe, env=environment).returncode == 0:
                break
            assert process.poll() is None, "the container command exited"
        else:
            raise AssertionError("the healthcheck never passed")
        image = encode(render_scene(3)[0])
        response = httpx.post(f"http://127.0.0.1:{port}/detect", content=image,
                              headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert response.status_code == 200 and response.json()["detections"]
    finally:
        process.terminate()
        assert process.wait(30) == 0


def test_make_run_installs_what_serving_needs_and_nothing_else() -> None:
    import tomllib

    makefile = (ROOT / "Makefile").read_text()
    run = re.search(r"^run: (.*)$", makefile, re.M).group(1).split()  # type: ignore[union-attr]
    assert run == ["$(SERVE)"]
    serve = makefile[makefile.index("$(SERVE): "):].split("\n\n")[0]
    assert "'.[cpu]'" in serve and "torch" not in serve and "dev" not in serve
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    served = " ".join(project["dependencies"] + project["optional-dependencies"]["cpu"])
    for heavy in ("torch", "transformers", "pytest", "playwright", "schemathesis"):
        assert heavy not in served, heavy
