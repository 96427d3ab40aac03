"""Request IDs, access logs, CORS, open paths, slow uploads and client disconnects."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from app.bench.stats import metric_value
from app.errors import ServiceError
from app.metrics import ERROR_CODES
from tests.helpers import (
    Server,
    encode,
    render_scene,
    run_server,
    scrape,
    wait_for_metrics,
    wait_until,
)

IMAGE = encode(render_scene(4)[0])


def test_every_error_code_has_a_metric_series_from_the_start() -> None:
    codes = {cls.code for cls in ServiceError.__subclasses__()} - {"client_closed"}
    assert codes <= set(ERROR_CODES)


def test_request_id_is_echoed_or_generated_and_logged_as_json(tmp_path: Path) -> None:
    with run_server(tmp_path, "--log-format", "json") as srv:
        given = httpx.post(f"{srv.url}/detect", content=IMAGE, timeout=30,
                           headers={"Content-Type": "image/jpeg", "X-Request-ID": "req-42"})
        assert given.headers["X-Request-ID"] == "req-42"
        made = httpx.get(f"{srv.url}/healthz").headers["X-Request-ID"]
        assert len(made) == 32 and made != "req-42"
        hostile = httpx.get(f"{srv.url}/healthz", headers={"X-Request-ID": "a b\tc"})
        assert hostile.headers["X-Request-ID"] != "a b\tc"  # not echoed as given

        def access_lines() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in srv.log().splitlines()
                     if line.startswith("{")]
            access = [e for e in lines if e["logger"] == "dfine.access"]
            ids = {e["request_id"] for e in access}
            return access if {"req-42", made} <= ids else []

        access = wait_until(access_lines, 30, "the access log lines of both requests")
    detect = next(e for e in access if e["request_id"] == "req-42")
    assert detect["status"] == 200 and detect["path"] == "/detect"
    assert detect["latency_ms"] > 0 and detect["batch_size"] == 1


def test_cors_is_off_by_default_and_on_for_configured_origins(server: Server,
                                                             tmp_path: Path) -> None:
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    off = httpx.options(f"{server.url}/detect", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    with run_server(tmp_path, "--cors-origins", "http://app.example") as srv:
        on = httpx.options(f"{srv.url}/detect", headers=preflight)
        assert on.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(f"{srv.url}/detect",
                              headers={**preflight, "Origin": "http://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_open_paths_are_configurable(tmp_path: Path) -> None:
    with run_server(tmp_path, "--api-key", "k", "--open-paths", "/healthz,/readyz") as srv:
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        refused = httpx.get(f"{srv.url}/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="dfine-serve"'
        assert httpx.get(f"{srv.url}/metrics", headers={"X-API-Key": "k"}).status_code == 200
        wrong = httpx.get(f"{srv.url}/model", headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and "k" not in wrong.json()["error"]["message"]


def test_loading_and_unloading_models_needs_the_control_key(tmp_path: Path) -> None:
    """The API key opens inference, the control key alone load and unload (issue 25)."""
    key, control = {"X-API-Key": "k"}, {"X-API-Key": "c"}
    with run_server(tmp_path, "--api-key", "k", "--control-api-key", "c",
                    "--model-control", "explicit") as srv:
        for call in ("index", "models/dfine_n_shapes/unload", "models/dfine_n_shapes/load"):
            refused = httpx.post(f"{srv.url}/v2/repository/{call}", timeout=30)
            assert refused.status_code == 401 and "error" in refused.json()
        forbidden = httpx.post(f"{srv.url}/v2/repository/models/dfine_n_shapes/unload",
                               headers=key, timeout=30)
        assert forbidden.status_code == 403 and "CONTROL_API_KEY" in forbidden.json()["error"]
        assert httpx.post(f"{srv.url}/v2/repository/models/dfine_n_shapes/unload",
                          headers=control, timeout=30).status_code == 200
        gone = httpx.post(f"{srv.url}/detect", content=encode(render_scene(1)[0]),
                          headers={**key, "Content-Type": "image/jpeg"}, timeout=30)
        assert gone.status_code == 404
        assert httpx.post(f"{srv.url}/v2/repository/models/dfine_n_shapes/load",
                          headers=control, timeout=60).status_code == 200
        again = httpx.post(f"{srv.url}/detect", content=encode(render_scene(1)[0]),
                           headers={**key, "Content-Type": "image/jpeg"}, timeout=30)
        assert again.status_code == 200


def test_slow_upload_is_cut_off_with_408(tmp_path: Path) -> None:
    with run_server(tmp_path, "--read-timeout-s", "0.5") as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 100000\r\n\r\n" + IMAGE[:1000])
            sock.settimeout(10)
            started = time.monotonic()
            reply = b""
            while b"}" not in reply:  # headers and body may come in two segments
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            assert time.monotonic() - started < 5
        assert reply.startswith(b"HTTP/1.1 408")
        assert b"request_timeout" in reply
        ok = httpx.post(f"{srv.url}/detect", content=IMAGE, timeout=30,
                        headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200


def test_requests_of_clients_that_disconnect_are_not_run(tmp_path: Path) -> None:
    # One image a run (~25 ms, several times that on a loaded machine): of 16 requests that
    # all wait in the queue, those still waiting when their clients go must never run.
    with run_server(tmp_path, "--instances", "1", "--max-batch-size", "1") as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        request = (b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                   b"Content-Length: " + str(len(IMAGE)).encode() + b"\r\n\r\n" + IMAGE)
        before = scrape(srv.url)

        def ran(text: str) -> float:
            return metric_value(text, "dfine_images_total") - metric_value(
                before, "dfine_images_total")

        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
        try:
            for sock in sockets:
                sock.sendall(request)
            # Every request read, decoded and either waiting or run: none can be lost before
            # the queue, so each one below is either cancelled or run.
            queued = wait_for_metrics(
                srv.url, lambda text: ran(text) + metric_value(text, "dfine_queue_depth") >= 16,
                60, "all 16 requests in the queue or run", interval_s=0.01)
        finally:
            for sock in sockets:
                sock.close()
        waiting = metric_value(queued, "dfine_queue_depth")
        answered = 'dfine_requests_total{endpoint="/detect"}'
        after = wait_for_metrics(
            srv.url, lambda text: metric_value(text, answered) - metric_value(
                before, answered) >= 16,
            60, "all 16 requests answered (499 for those whose client went)")
        cancelled = metric_value(after, "dfine_cancelled_total") - metric_value(
            before, "dfine_cancelled_total")
        # Before the fix none was cancelled: all 16 ran. Those taken by the engine between
        # the scrape and the server seeing the close (a few runs at most) run anyway.
        assert waiting >= 8, (waiting, ran(queued))
        assert cancelled >= 4, (waiting, cancelled, ran(after))
        assert ran(after) + cancelled == 16, (cancelled, ran(after))
        ok = httpx.post(f"{srv.url}/detect", content=IMAGE, timeout=30,
                        headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200


def test_with_an_api_key_the_api_description_is_closed_unless_opened(tmp_path: Path) -> None:
    # Decided: every route checks the key, /docs and /openapi.json included; OPEN_PATHS
    # publishes them.
    with run_server(tmp_path, "--api-key", "k") as srv:
        for path in ("/docs", "/openapi.json", "/model"):
            assert httpx.get(f"{srv.url}{path}").status_code == 401, path
        assert httpx.get(f"{srv.url}/openapi.json", headers={"X-API-Key": "k"}).json()["paths"]
        assert httpx.get(f"{srv.url}/").status_code == 200  # the page asks for the key itself
    with run_server(tmp_path, "--api-key", "k", "--open-paths",
                    "/healthz,/readyz,/metrics,/docs,/openapi.json") as srv:
        assert httpx.get(f"{srv.url}/docs").status_code == 200
        assert httpx.get(f"{srv.url}/openapi.json").status_code == 200
        assert httpx.get(f"{srv.url}/model").status_code == 401


def test_docs_come_from_local_files_under_a_strict_policy(server: Server) -> None:
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "http" not in docs.text.replace("http-equiv", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "docs.js"):
        got = httpx.get(f"{server.url}/static/swagger/{asset}")
        assert got.status_code == 200 and len(got.content) > 100, asset
    assert "script-src 'self';" in docs.headers["content-security-policy"]
    assert httpx.get(f"{server.url}/redoc").status_code == 404  # one API page


def test_every_answer_carries_security_headers_and_no_server_header(server: Server) -> None:
    answers = [httpx.get(f"{server.url}/"), httpx.get(f"{server.url}/healthz"),
               httpx.post(f"{server.url}/detect", content=b"junk", timeout=30,
                          headers={"Content-Type": "image/jpeg"}),
               httpx.get(f"{server.url}/nowhere")]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert "server" not in answer.headers
    page_policy = answers[0].headers["content-security-policy"]
    assert "'unsafe-inline'" not in page_policy and "'sha256-" in page_policy
    assert answers[1].headers["content-security-policy"].startswith("default-src 'none'")


def test_head_is_answered_like_get_without_a_body(server: Server) -> None:
    for path in ("/healthz", "/readyz", "/model", "/metrics", "/"):
        head, get = httpx.head(f"{server.url}{path}"), httpx.get(f"{server.url}{path}")
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers[
            "content-type"]


def test_model_endpoint_names_the_file_without_its_location(server: Server) -> None:
    assert httpx.get(f"{server.url}/model").json()["path"] == "dfine_n_shapes.onnx"
