"""Prometheus config, alert rules and the Grafana dashboard against the live service, and a real
Prometheus scraping a real server."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx

from tests.deploy.conftest import require
from tests.helpers import ROOT, Server, encode, free_port, render_scene

PROM = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "dfine.json"


def promtool(*args: str, cwd: Path = PROM, stdin: str | None = None) -> str:
    result = subprocess.run([require("promtool"), *args], cwd=cwd, input=stdin,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_prometheus_config_and_rules_are_valid_and_alerts_unit_tested() -> None:
    promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert "4 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts.test.yml")


def exported_names(metrics_text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()
            if line and not line.startswith("#")}


def test_dashboard_queries_only_metrics_the_service_exports(live: Server) -> None:
    httpx.post(f"{live.url}/detect", content=encode(render_scene(1)[0]),
               headers={"Content-Type": "image/jpeg"}, timeout=30)
    exported = exported_names(httpx.get(f"{live.url}/metrics").text)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bdfine_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "errors", "p99", "queue wait", "average batch",
                  "distribution", "queue depth", "images per second"):
        assert topic in titles
    rules = (PROM / "alerts.yml").read_text()
    assert set(re.findall(r"\bdfine_[a-z_]+", rules)) <= exported


def test_promtool_accepts_the_live_exposition(live: Server) -> None:
    text = httpx.get(f"{live.url}/metrics").text
    promtool("check", "metrics", stdin=text)


def test_real_prometheus_scrapes_requests_and_latency(live: Server, workdir: Path) -> None:
    port = free_port()
    target = live.url.removeprefix("http://")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: dfine\n    static_configs: [{{targets: ['{target}']}}]\n")
    process = subprocess.Popen(
        [require("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir}/db",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str) -> list[dict[str, object]]:
        response = httpx.get(api, params={"query": expr}, timeout=5).json()
        result: list[dict[str, object]] = response["data"]["result"]
        return result

    try:
        image = encode(render_scene(2)[0])
        for _ in range(10):
            assert httpx.post(f"{live.url}/detect", content=image, timeout=30,
                              headers={"Content-Type": "image/jpeg"}).status_code == 200
        deadline = time.monotonic() + 60
        count: float = 0
        while time.monotonic() < deadline:
            try:
                rows = query('dfine_requests_total{endpoint="/detect",status="200"}')
                count = float(rows[0]["value"][1]) if rows else 0  # type: ignore[index]
            except (httpx.HTTPError, KeyError):
                pass
            if count >= 10:
                break
            time.sleep(0.5)
        assert count >= 10
        p50 = query('histogram_quantile(0.5, sum by (le) '
                    '(dfine_request_duration_seconds_bucket{endpoint="/detect"}))')
        value = float(p50[0]["value"][1])  # type: ignore[index]
        assert 0 < value < 10
    finally:
        process.terminate()
        process.wait(10)
