"""Prometheus config, alert rules and the Grafana dashboard against the live service, and a real
Prometheus scraping a real server."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import yaml

from tests.deploy.conftest import require
from tests.helpers import ROOT, Server, encode, free_port, render_scene, run_server, wait_until
from tests.video.scene import write_video

PROM = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "dfine.json"


def promtool(*args: str, cwd: Path = PROM, stdin: str | None = None) -> str:
    result = subprocess.run([require("promtool"), *args], cwd=cwd, input=stdin,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_prometheus_config_and_rules_are_valid_and_alerts_unit_tested() -> None:
    promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert "8 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts.test.yml")


# The names of a family's samples, by its type (the suffixes a query may name).
SAMPLE_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}


def exported_names(metrics_text: str) -> set[str]:
    """The series names of the exposition, and those of the families it declares with no series
    yet (a `# TYPE` line alone: a stream's metrics before any stream exists)."""
    names = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()
             if line and not line.startswith("#")}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.update(family + suffix for suffix in SAMPLE_SUFFIXES.get(kind, ("",)))
    return names


def panel_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every target's query (rows have none)."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_the_service_exports(live: Server) -> None:
    httpx.post(f"{live.url}/detect", content=encode(render_scene(1)[0]),
               headers={"Content-Type": "image/jpeg"}, timeout=30)
    exported = exported_names(httpx.get(f"{live.url}/metrics").text)
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for e in panel_queries(dashboard) for name in re.findall(r"\bdfine_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "errors", "p99", "queue wait", "average batch",
                  "distribution", "queue depth", "images per second", "streams by state",
                  "fps in and out", "stream lag", "dropped", "reconnects",
                  "client websocket sessions", "client frames"):
        assert topic in titles
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Streams"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    boxes = [(g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"])
             for g in (p["gridPos"] for p in dashboard["panels"])]
    for k, a in enumerate(boxes):  # no panel hides another
        for b in boxes[k + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    rules = (PROM / "alerts.yml").read_text()
    assert set(re.findall(r"\bdfine_[a-z_]+", rules)) <= exported


def test_promtool_accepts_the_live_exposition(live: Server) -> None:
    text = httpx.get(f"{live.url}/metrics").text
    promtool("check", "metrics", stdin=text)


class Query(Protocol):
    def __call__(self, expr: str, at: float | None = None) -> list[dict[str, Any]]: ...


@contextlib.contextmanager
def prometheus(workdir: Path, target: str) -> Iterator[Query]:
    """A real Prometheus (Debian's) on loopback scraping ``target`` every second; yields a
    function that runs an instant query through its HTTP API (now, or ``at`` a Unix time)."""
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: dfine\n    static_configs: [{{targets: ['{target}']}}]\n")
    process = subprocess.Popen(
        [require("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir}/db",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    def query(expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": str(at)}
        response = httpx.get(api, params=params, timeout=5).json()
        result: list[dict[str, Any]] = response["data"]["result"]
        return result

    try:
        yield query
    finally:
        process.terminate()
        process.wait(10)


def grafana_filled(expr: str, model: str = ".*") -> str:
    """A panel's query as Grafana sends it: its variables filled in."""
    return expr.replace("$model", model).replace("$__rate_interval", "1m")


def panel_target(dashboard: dict[str, Any], title: str, legend: str) -> str:
    panel = next(p for p in dashboard["panels"] if p["title"] == title)
    return grafana_filled(next(t["expr"] for t in panel["targets"]
                               if t["legendFormat"] == legend))


def by_label(query: Query, expr: str, label: str) -> dict[str, float]:
    """An instant query's values by one label."""
    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
        return {row["metric"].get(label, ""): float(row["value"][1]) for row in query(expr)}
    return {}


def wait_for(query: Query, expr: str, done: Callable[[float], bool], timeout_s: float = 60
             ) -> float:
    """The value of ``expr`` once ``done`` accepts it (targets are applied on a 5 s tick)."""
    deadline = time.monotonic() + timeout_s
    value = 0.0
    while time.monotonic() < deadline:
        # ValueError: a Prometheus still starting answers "Service Unavailable", not JSON.
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
            rows = query(expr)
            value = float(rows[0]["value"][1]) if rows else 0.0
            if done(value):
                return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} stayed at {value}")


def test_real_prometheus_scrapes_requests_and_latency(live: Server, workdir: Path) -> None:
    with prometheus(workdir, live.url.removeprefix("http://")) as query:
        image = encode(render_scene(2)[0])
        for _ in range(10):
            assert httpx.post(f"{live.url}/detect", content=image, timeout=30,
                              headers={"Content-Type": "image/jpeg"}).status_code == 200
        count = wait_for(query, 'dfine_requests_total{endpoint="/detect",status="200"}',
                         lambda v: v >= 10)
        assert count >= 10
        p50 = query('histogram_quantile(0.5, sum by (le) '
                    '(dfine_request_duration_seconds_bucket{endpoint="/detect"}))')
        value = float(p50[0]["value"][1])
        assert 0 < value < 10
        # The dashboard's model selector: its variable's query, then a panel filtered by it.
        models = {row["metric"]["model"] for row in query("dfine_model_info")}
        assert models == {"dfine_n_shapes"}
        dashboard = json.loads(DASHBOARD.read_text())
        variable = dashboard["templating"]["list"][0]
        assert variable["name"] == "model" and "dfine_model_info" in variable["definition"]
        panel = next(p for p in dashboard["panels"] if "request rate" in p["title"].lower())
        expr = (panel["targets"][0]["expr"].replace("$model", "dfine_n_shapes")
                .replace("$__rate_interval", "1m"))
        for _ in range(3):  # increments after the first scrapes, for rate() to see
            time.sleep(1)
            httpx.post(f"{live.url}/detect", content=image, timeout=30,
                       headers={"Content-Type": "image/jpeg"})
        assert wait_for(query, expr.replace("sum by (status)", "sum"), lambda v: v > 0) > 0
        other = expr.replace('model=~"dfine_n_shapes"', 'model=~"another"')
        assert query(other.replace("sum by (status)", "sum")) == []
        # Every panel's query is one Prometheus runs (an error answer has no "data").
        refused = []
        for each in panel_queries(dashboard):
            try:
                query(grafana_filled(each, "dfine_n_shapes"))
            except KeyError:
                refused.append(each)
        assert refused == []


def test_the_autoscaling_query_measures_the_queue_under_load(live: Server,
                                                            workdir: Path) -> None:
    """The prometheus-adapter rule of deploy/k8s, evaluated as the adapter would (its
    templates filled in for this scrape), against the live service while 24 clients keep its
    queue full: it gives the mean of the queue depth's samples of the last minute."""
    rule = yaml.safe_load(yaml.safe_load((ROOT / "deploy/k8s/base/prometheus-adapter-rules.yaml")
                                         .read_text())["data"]["config.yaml"])["rules"][0]
    expr = (rule["metricsQuery"].replace("<<.Series>>", "dfine_queue_depth")
            .replace("<<.LabelMatchers>>", 'job="dfine"').replace("<<.GroupBy>>", "job"))
    image = encode(render_scene(3)[0])
    with prometheus(workdir, live.url.removeprefix("http://")) as query:
        wait_for(query, 'up{job="dfine"}', lambda v: v == 1)
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    http.post(f"{live.url}/detect", content=image,
                              headers={"Content-Type": "image/jpeg"})

        threads = [threading.Thread(target=client) for _ in range(24)]
        for thread in threads:
            thread.start()
        try:
            # Several scrapes (1 s apart) of a queue under load, whatever the machine's speed.
            wait_for(query, 'count_over_time((sum(dfine_queue_depth{job="dfine"}) >= 2)[1m:1s])',
                     lambda v: v >= 5)
            wait_for(query, expr, lambda v: v > 0)
            # Both at one moment, a few seconds back (scrapes landing between two queries made
            # "now" would change the second's minute), and the scraped samples themselves: a
            # subquery's 1 s steps weigh a sample by how long it stood, and scrapes of a loaded
            # server come late or fail.
            at = time.time() - 3
            value = float(query(expr, at)[0]["value"][1])
            series = query('dfine_queue_depth{job="dfine"}[1m]', at)
            assert len(series) == 1  # one model version
            samples = series[0]["values"]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    mean = sum(float(v) for _, v in samples) / len(samples)
    assert value == pytest.approx(mean, rel=1e-6)  # the samples of the query's own moment
    assert 2 <= max(float(v) for _, v in samples) <= 32  # a queue (MAX_QUEUE 32) under load


def test_real_prometheus_follows_a_file_stream_through_the_streams_row(workdir: Path) -> None:
    """A file stream in a real server scraped by a real Prometheus: the Streams row's queries
    see its frames, fps and lag while it runs and its state once ended; Prometheus counts the
    frames the API says; and DfineStreamDown's expression leaves an ended file alone (a file
    that ended is no fault)."""
    videos = workdir / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", frames=150, fps=10)  # seconds of engine runs: scrapes
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    down = next(r["expr"] for r in rules if r["alert"] == "DfineStreamDown")
    with run_server(workdir, env={"DFINE_VIDEO_DIR": str(videos)}) as server, \
            prometheus(workdir, server.url.removeprefix("http://")) as query:
        wait_for(query, 'up{job="dfine"}', lambda v: v == 1)
        created = httpx.post(f"{server.url}/streams", timeout=30,
                             json={"source": "clip.mp4", "tracking": False})
        assert created.status_code == 201, created.text
        stream = created.json()["id"]
        fps_out = panel_target(dashboard, "Stream fps in and out", "{{stream}} out")
        fps_in = panel_target(dashboard, "Stream fps in and out", "{{stream}} in")
        wait_until(lambda: by_label(query, fps_out, "stream").get(stream, 0) > 0, 60,
                   "the stream's fps out in Prometheus")
        assert by_label(query, fps_in, "stream").get(stream, 0) > 0

        def ended() -> dict[str, Any]:
            answer: dict[str, Any] = httpx.get(f"{server.url}/streams/{stream}", timeout=10).json()
            return answer if answer["state"] == "ended" else {}

        final = wait_until(ended, 120, "the file stream ended")
        states = panel_target(dashboard, "Streams by state", "{{state}}")
        wait_until(lambda: by_label(query, states, "state").get("ended") == 1, 60,
                   "the ended state scraped")
        processed = f'dfine_stream_frames_processed_total{{stream="{stream}"}}'
        assert by_label(query, processed, "stream") == {stream: final["frames_processed"]}
        assert final["frames_processed"] > 0
        p99 = by_label(query, panel_target(dashboard, "Stream lag (per stream, p50, p99)",
                                           "p99 (all streams)"), "")
        assert 0 < p99[""] < 30
        assert [row for row in query(down) if row["metric"]["stream"] == stream] == []
