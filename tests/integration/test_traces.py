"""Traces (the trace extension and OpenTelemetry export), against a real server and an OTLP
receiver started here: a small HTTP server taking POST /v1/traces, its protobuf body decoded
with opentelemetry-proto. The settings are read and changed with tritonclient's own HTTP and
gRPC clients; the spans are checked as the collector receives them. With FRONTENDS=2 the
settings are the service's: changed through one front end, they are read and in force through
the other, and outlive the engine process."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import secrets
import signal
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from app.bench.cli import free_port
from tests.helpers import Server, encode, render_scene, run_server, wait_until
from tests.integration.test_frontends import (
    ask,
    children,
    connections_to_each,
    engine_pid,
    frontend_pids,
)

MODEL = "dfine_n_shapes"
READ_KEY, CONTROL_KEY = "read-key-1", "control-key-1"
READ = {"x-api-key": READ_KEY}  # (gRPC metadata keys are lower-case)
CONTROL = {"x-api-key": CONTROL_KEY}
STAGES = {"decode", "queue", "engine_run", "postprocess"}


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service: str


@dataclass
class Receiver:
    """What the collector received, span by span."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def traces(self) -> set[str]:
        with self.lock:
            return {s.trace_id for s in self.spans}


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value") or "string_value")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
            spans = []
            for resource_spans in request.resource_spans:
                service = {a.key: _value(a.value) for a in resource_spans.resource.attributes
                           }.get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        spans.append(Span(
                            s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            s.start_time_unix_nano, s.end_time_unix_nano,
                            {a.key: _value(a.value) for a in s.attributes}, service))
            with received.lock:
                received.spans.extend(spans)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    received.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Running:
    url: str
    grpc: str


@pytest.fixture(scope="module")
def running(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    port = free_port()
    # Spans leave in batches every 100 ms here (the SDK's default is 5 s).
    with run_server(tmp_path_factory.mktemp("traces"), "--grpc-port", str(port), env={
            "DFINE_OTLP_ENDPOINT": receiver.url, "DFINE_API_KEY": READ_KEY,
            "DFINE_CONTROL_API_KEY": CONTROL_KEY, "OTEL_BSP_SCHEDULE_DELAY": "100"}) as server:
        yield Running(server.url, f"127.0.0.1:{port}")


@pytest.fixture
def http_client(running: Running) -> Iterator[thttp.InferenceServerClient]:
    client = thttp.InferenceServerClient(running.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def grpc_client(running: Running) -> Iterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(running.grpc)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def settings_restored(running: Running) -> Iterator[None]:
    """Each test starts from the start values (off), with no model's own settings."""
    yield
    cleared = {"trace_level": None, "trace_rate": None, "trace_count": None}
    for path in (f"/v2/models/{MODEL}/trace/setting", "/v2/trace/setting"):
        httpx.post(f"{running.url}{path}", json=cleared, headers=CONTROL,
                   timeout=30).raise_for_status()


JPEG = encode(render_scene(3)[0])


def _caller() -> tuple[str, str, str]:
    """A caller's trace id, span id and W3C traceparent."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _detect(running: Running, traceparent: str | None = None, path: str = "/detect"
            ) -> httpx.Response:
    headers = {**READ, "Content-Type": "image/jpeg"}
    if traceparent:
        headers["traceparent"] = traceparent
    if path == "/detect/batch":
        response = httpx.post(f"{running.url}{path}", headers={
            k: v for k, v in headers.items() if k != "Content-Type"},
            files=[("images", ("a.jpg", JPEG)), ("images", ("b.jpg", JPEG))], timeout=60)
    else:
        response = httpx.post(f"{running.url}{path}", content=JPEG, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def _trace_of(receiver: Receiver, trace_id: str, root: str, images: int = 1) -> list[Span]:
    """The spans of one trace once its root and every image's stages have arrived."""
    def complete() -> list[Span]:
        spans = receiver.of(trace_id)
        names = [s.name for s in spans]
        done = root in names and all(names.count(n) >= images for n in STAGES)
        return spans if done else []

    return wait_until(complete, 30, f"the spans of trace {trace_id} at the receiver")


def _check_tree(spans: list[Span], root_name: str, caller_span: str, images: int = 1) -> Span:
    """One root (the caller's span its parent), each image's stages its children, inside it,
    in order; the engine run says its batch."""
    root = next(s for s in spans if s.name == root_name)
    assert root.parent == caller_span
    assert root.service == "dfine-serve"
    status = "dfine.status" if root_name.startswith("grpc") else "http.response.status_code"
    assert root.attributes[status] == 200
    assert root.attributes["dfine.model"] == MODEL
    children = [s for s in spans if s is not root]
    assert sorted(s.name for s in children) == sorted(list(STAGES) * images)
    for span in children:
        assert span.parent == root.span_id
        assert root.start_ns <= span.start_ns <= span.end_ns <= root.end_ns, span
    for run in (s for s in children if s.name == "engine_run"):
        assert 1 <= run.attributes["dfine.batch_size"] <= images
        assert run.attributes["dfine.run_id"]
    if images == 1:
        by_name = {s.name: s for s in children}
        assert by_name["decode"].end_ns <= by_name["queue"].start_ns + 1000
        assert by_name["queue"].end_ns <= by_name["engine_run"].start_ns + 1000
        assert by_name["engine_run"].end_ns <= by_name["postprocess"].start_ns + 1000
    return root


def _enable(client: thttp.InferenceServerClient, **settings: str) -> dict[str, Any]:
    body = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", **settings}
    return dict(client.update_trace_settings(settings=body, headers=CONTROL))


def test_off_by_default_then_on_over_http(running: Running, receiver: Receiver,
                                          http_client: thttp.InferenceServerClient) -> None:
    assert http_client.get_trace_settings(headers=READ) == {
        "trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
        "log_frequency": "0", "trace_mode": "opentelemetry", "url": receiver.url}
    _, _, untraced = _caller()
    for _ in range(3):
        assert "traceparent" not in _detect(running, untraced).headers
    assert _enable(http_client) == {
        "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "-1",
        "log_frequency": "0", "trace_mode": "opentelemetry", "url": receiver.url}
    trace_id, span_id, traceparent = _caller()
    answered = _detect(running, traceparent).headers["traceparent"]
    version, returned_trace, returned_span, flags = answered.split("-")
    assert (version, returned_trace, flags) == ("00", trace_id, "01")
    spans = _trace_of(receiver, trace_id, "POST /detect")
    root = _check_tree(spans, "POST /detect", span_id)
    assert root.span_id == returned_span
    assert root.attributes["http.route"] == "/detect"
    # The spans leave in order: the three requests made while off would have come first.
    assert untraced.split("-")[1] not in receiver.traces()


@pytest.mark.parametrize("path", ["/detect/batch", "/detect/render"])
def test_batch_and_render_are_traced(running: Running, receiver: Receiver,
                                     http_client: thttp.InferenceServerClient, path: str) -> None:
    _enable(http_client)
    trace_id, span_id, traceparent = _caller()
    _detect(running, traceparent, path)
    images = 2 if path == "/detect/batch" else 1
    _check_tree(_trace_of(receiver, trace_id, f"POST {path}", images), f"POST {path}",
                span_id, images)


def test_a_trace_without_a_caller_starts_its_own(running: Running, receiver: Receiver,
                                                 http_client: thttp.InferenceServerClient
                                                 ) -> None:
    _enable(http_client)
    trace_id = _detect(running).headers["traceparent"].split("-")[1]
    _check_tree(_trace_of(receiver, trace_id, "POST /detect"), "POST /detect", "")


def test_v2_infer_over_rest_and_grpc_continue_the_callers_trace(
        running: Running, receiver: Receiver, http_client: thttp.InferenceServerClient) -> None:
    _enable(http_client)
    image = np.asarray([JPEG], dtype=object)
    rest_input = thttp.InferInput("image", [1], "BYTES")
    rest_input.set_data_from_numpy(image)
    trace_id, span_id, traceparent = _caller()
    http_client.infer(MODEL, [rest_input], headers={**READ, "traceparent": traceparent})
    route = "POST /v2/models/{name}/infer"
    _check_tree(_trace_of(receiver, trace_id, route), route, span_id)

    # gRPC: the caller's traceparent as metadata; the service's comes back in the trailers.
    trace_id, span_id, traceparent = _caller()
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[
        pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(JPEG)) + JPEG])
    with grpc.insecure_channel(running.grpc) as channel:
        _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, metadata=(("x-api-key", READ_KEY), ("traceparent", traceparent)),
            timeout=60)
    answered = dict(call.trailing_metadata())["traceparent"]
    assert answered.split("-")[1] == trace_id
    spans = _trace_of(receiver, trace_id, "grpc ModelInfer")
    root = _check_tree(spans, "grpc ModelInfer", span_id)
    assert root.span_id == answered.split("-")[2]
    assert root.attributes["rpc.method"] == "ModelInfer"

    # tritonclient's gRPC client passes headers as metadata too.
    trace_id, span_id, traceparent = _caller()
    grpc_input = tgrpc.InferInput("image", [1], "BYTES")
    grpc_input.set_data_from_numpy(image)
    with tgrpc.InferenceServerClient(running.grpc) as client:
        client.infer(MODEL, [grpc_input], headers={**READ, "traceparent": traceparent})
    _check_tree(_trace_of(receiver, trace_id, "grpc ModelInfer"), "grpc ModelInfer", span_id)


def _traced(running: Running, requests: int) -> list[bool]:
    """Which of ``requests`` /detect calls in a row were traced (their answer's traceparent)."""
    return ["traceparent" in _detect(running).headers for _ in range(requests)]


def test_rate_traces_one_request_in_n(running: Running, receiver: Receiver,
                                      http_client: thttp.InferenceServerClient) -> None:
    _enable(http_client, trace_rate="3")
    assert _traced(running, 7) == [False, False, True, False, False, True, False]


def test_count_stops_tracing_and_an_update_starts_again(
        running: Running, http_client: thttp.InferenceServerClient) -> None:
    _enable(http_client, trace_count="2")
    assert _traced(running, 3) == [True, True, False]
    settings = http_client.get_trace_settings(headers=READ)
    assert (settings["trace_level"], settings["trace_count"]) == (["TIMESTAMPS"], "0")
    http_client.update_trace_settings(settings={"trace_count": "1"}, headers=CONTROL)
    assert _traced(running, 2) == [True, False]


def test_model_settings_over_grpc_fall_back_to_the_global_ones(
        running: Running, receiver: Receiver, http_client: thttp.InferenceServerClient,
        grpc_client: tgrpc.InferenceServerClient) -> None:
    answer = grpc_client.get_trace_settings(headers=READ, as_json=True)
    assert answer["settings"]["trace_level"] == {"value": ["OFF"]}
    assert answer["settings"]["trace_mode"] == {"value": ["opentelemetry"]}
    updated = grpc_client.update_trace_settings(
        MODEL, {"trace_level": ["TIMESTAMPS"], "trace_rate": "2"}, headers=CONTROL,
        as_json=True)["settings"]
    assert (updated["trace_level"], updated["trace_rate"], updated["trace_count"]) == (
        {"value": ["TIMESTAMPS"]}, {"value": ["2"]}, {"value": ["-1"]})
    # The global settings are untouched; the model's are its own, read over both clients.
    assert http_client.get_trace_settings(headers=READ)["trace_level"] == ["OFF"]
    assert http_client.get_trace_settings(MODEL, headers=READ)["trace_rate"] == "2"
    assert _traced(running, 4) == [False, True, False, True]
    # A value the model was not given follows the global one; a cleared one falls back.
    http_client.update_trace_settings(settings={"trace_count": "5"}, headers=CONTROL)
    assert grpc_client.get_trace_settings(MODEL, headers=READ).settings[
        "trace_count"].value == ["5"]
    cleared = grpc_client.update_trace_settings(
        MODEL, {"trace_level": None, "trace_rate": None}, headers=CONTROL, as_json=True)
    assert cleared["settings"]["trace_level"] == {"value": ["OFF"]}
    assert cleared["settings"]["trace_rate"] == {"value": ["1000"]}
    assert _traced(running, 2) == [False, False]


@pytest.mark.parametrize(("settings", "status", "grpc_status"), [
    ({"trace_rate": "0"}, "422", "StatusCode.INVALID_ARGUMENT"),
    ({"trace_rate": "often"}, "422", "StatusCode.INVALID_ARGUMENT"),
    ({"trace_count": "-2"}, "422", "StatusCode.INVALID_ARGUMENT"),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, "422", "StatusCode.INVALID_ARGUMENT"),
    ({"trace_level": ["LOUD"]}, "422", "StatusCode.INVALID_ARGUMENT"),
    ({"trace_level": ["TENSORS"]}, "501", "StatusCode.UNIMPLEMENTED"),
    ({"trace_file": "/tmp/trace.json"}, "501", "StatusCode.UNIMPLEMENTED"),
    ({"url": "http://elsewhere:4318/v1/traces"}, "501", "StatusCode.UNIMPLEMENTED"),
    ({"trace_mode": "triton"}, "422", "StatusCode.INVALID_ARGUMENT"),
    ({"trace_colour": "blue"}, "422", "StatusCode.INVALID_ARGUMENT"),
])
def test_bad_updates_are_refused_and_change_nothing(
        http_client: thttp.InferenceServerClient, grpc_client: tgrpc.InferenceServerClient,
        settings: dict[str, Any], status: str, grpc_status: str) -> None:
    before = http_client.get_trace_settings(headers=READ)
    with pytest.raises(InferenceServerException) as refused:
        http_client.update_trace_settings(settings={"trace_rate": "5", **settings},
                                          headers=CONTROL)
    assert refused.value.status() == status, refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.update_trace_settings(settings={"trace_rate": "5", **settings},
                                          headers=CONTROL)
    assert refused.value.status() == grpc_status, refused.value.message()
    assert http_client.get_trace_settings(headers=READ) == before


def test_changes_need_the_control_key_and_models_must_exist(
        running: Running, http_client: thttp.InferenceServerClient,
        grpc_client: tgrpc.InferenceServerClient) -> None:
    change = {"trace_level": ["TIMESTAMPS"]}
    for headers, status, grpc_status in ((READ, "403", "StatusCode.PERMISSION_DENIED"),
                                         (None, "401", "StatusCode.UNAUTHENTICATED")):
        with pytest.raises(InferenceServerException) as refused:
            http_client.update_trace_settings(settings=change, headers=headers)
        assert refused.value.status() == status
        with pytest.raises(InferenceServerException) as refused:
            grpc_client.update_trace_settings(settings=change, headers=headers)
        assert refused.value.status() == grpc_status
    with pytest.raises(InferenceServerException) as refused:
        http_client.get_trace_settings(headers=None)
    assert refused.value.status() == "401"
    with pytest.raises(InferenceServerException) as refused:
        http_client.get_trace_settings("no_such_model", headers=READ)
    assert refused.value.status() == "404"
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.update_trace_settings("no_such_model", change, headers=CONTROL)
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    # Numbers, a bare level and an empty body are taken over REST; answers are strings.
    answer = httpx.post(f"{running.url}/v2/trace/setting", headers=CONTROL,
                        json={"trace_level": "timestamps", "trace_rate": 7}).json()
    assert (answer["trace_level"], answer["trace_rate"]) == (["TIMESTAMPS"], "7")
    assert httpx.post(f"{running.url}/v2/trace/setting", headers=CONTROL).json() == answer
    assert http_client.get_trace_settings(headers=READ)["trace_level"] == ["TIMESTAMPS"]


@pytest.fixture(scope="module")
def two_frontends(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("traces_frontends"), "--frontends", "2", env={
            "DFINE_OTLP_ENDPOINT": receiver.url, "DFINE_TRACE_LEVEL": "timestamps",
            "DFINE_TRACE_RATE": "1", "DFINE_API_KEY": READ_KEY,
            "DFINE_CONTROL_API_KEY": CONTROL_KEY, "OTEL_BSP_SCHEDULE_DELAY": "100"}) as server:
        yield server


def test_start_values_and_an_engine_in_another_process(receiver: Receiver,
                                                       two_frontends: Server) -> None:
    """TRACE_LEVEL and TRACE_RATE at start; with FRONTENDS=2 the engine runs in its own
    process, and its run's times (its clock) still fall inside the front end's span."""
    server = two_frontends
    settings = httpx.get(f"{server.url}/v2/trace/setting", headers=READ, timeout=30).json()
    assert (settings["trace_level"], settings["trace_rate"]) == (["TIMESTAMPS"], "1")
    running = Running(server.url, "")
    for _ in range(2):  # whichever front end takes them
        trace_id, span_id, traceparent = _caller()
        _detect(running, traceparent)
        _check_tree(_trace_of(receiver, trace_id, "POST /detect"), "POST /detect",
                    span_id)


def _post(connection: http.client.HTTPConnection, path: str, body: dict[str, Any]
          ) -> dict[str, Any]:
    status, answer = ask(connection, "POST", path, json.dumps(body).encode(),
                         {**CONTROL, "Content-Type": "application/json"})
    assert status == 200, answer
    return dict(json.loads(answer))


def _get(connection: http.client.HTTPConnection, path: str) -> dict[str, Any]:
    status, answer = ask(connection, "GET", path, headers=READ)
    assert status == 200, answer
    return dict(json.loads(answer))


def _traceparent_of(connection: http.client.HTTPConnection, traceparent: str) -> str | None:
    """The traceparent answered to a /detect through ``connection`` (None: not traced)."""
    connection.request("POST", "/detect", body=JPEG, headers={
        **READ, "Content-Type": "image/jpeg", "traceparent": traceparent})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.read()
    return response.getheader("traceparent")


def _restore(server: Server) -> None:
    cleared = {"trace_level": None, "trace_rate": None, "trace_count": None}
    for path in (f"/v2/models/{MODEL}/trace/setting", "/v2/trace/setting"):
        httpx.post(f"{server.url}{path}", json=cleared, headers=CONTROL,
                   timeout=30).raise_for_status()


def test_a_change_through_one_front_end_is_in_force_in_every_one(
        receiver: Receiver, two_frontends: Server) -> None:
    """Answered once every front end follows it: a read, or a request, that follows on the
    other front end sees it."""
    server = two_frontends
    first, second = connections_to_each(server, frontend_pids(server)).values()
    try:
        assert _post(first, "/v2/trace/setting", {"trace_level": ["OFF"]})[
            "trace_level"] == ["OFF"]
        assert _get(second, "/v2/trace/setting")["trace_level"] == ["OFF"]
        assert _traceparent_of(second, _caller()[2]) is None
        model = f"/v2/models/{MODEL}/trace/setting"
        answer = _post(second, model, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
        assert (answer["trace_level"], answer["trace_rate"]) == (["TIMESTAMPS"], "1")
        assert _get(first, model) == answer
        assert _get(first, "/v2/trace/setting")["trace_level"] == ["OFF"]
        for connection in (first, second):
            trace_id, span_id, traceparent = _caller()
            assert _traceparent_of(connection, traceparent)
            _check_tree(_trace_of(receiver, trace_id, "POST /detect"), "POST /detect",
                        span_id)
        # The counters are each front end's: a count of 1 is one trace through each.
        _post(first, model, {"trace_count": "1"})
        for connection in (first, second):
            assert _traceparent_of(connection, _caller()[2])
            assert _traceparent_of(connection, _caller()[2]) is None
            assert _get(connection, model)["trace_count"] == "0"
    finally:
        _restore(server)


def test_the_settings_outlive_a_restarted_engine_process(two_frontends: Server) -> None:
    """The front ends hand the settings they follow to the engine process started again,
    rather than it turning the service back to the start values."""
    server = two_frontends
    connections = connections_to_each(server, frontend_pids(server))
    first, second = connections.values()
    try:
        _post(first, "/v2/trace/setting", {"trace_rate": "7"})
        _post(second, f"/v2/models/{MODEL}/trace/setting", {"trace_level": ["OFF"]})
        engine = engine_pid(server)
        os.kill(engine, signal.SIGKILL)
        wait_until(lambda: next((p for p, r in children(server.process.pid).items()
                                 if r == "engine" and p != engine), None), 60,
                   "a new engine process")
        # Every connection asked at each try: none idles past uvicorn's keep-alive (5 s).
        wait_until(lambda: all([ask(c, "GET", "/readyz")[0] == 200
                                for c in connections.values()]), 120, "readiness again")
        for connection in (first, second):
            assert _get(connection, "/v2/trace/setting")["trace_rate"] == "7"
            assert _get(connection, f"/v2/models/{MODEL}/trace/setting")["trace_level"] == [
                "OFF"]
        # And the engine process goes on from there: a change still reaches both.
        _post(second, "/v2/trace/setting", {"trace_rate": "9"})
        assert _get(first, "/v2/trace/setting")["trace_rate"] == "9"
    finally:
        _restore(server)
