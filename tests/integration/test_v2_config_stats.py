"""The Open Inference Protocol's model configuration, statistics, log settings and server
metadata, through tritonclient's own HTTP and gRPC clients against a real server: the two
transports answer alike, the statistics move by exactly the inferences made and agree with
/metrics, the log level changes at run time behind the control key; with FRONTENDS=2, for every
process of the service, whichever front end took the change."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from functools import partial
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from google.protobuf import json_format  # type: ignore[import-untyped]
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from app.api.v2_extensions import EXTENSIONS
from app.bench.cli import free_port
from app.bench.stats import metric_value
from tests.helpers import Server, encode, render_scene, run_server, wait_until
from tests.integration.test_frontends import ask, connections_to_each, frontend_pids

MODEL = "dfine_n_shapes"
KEY = {"authorization": "Bearer k"}
CONTROL = {"authorization": "Bearer c"}
NOT_FOUND = str(grpc.StatusCode.NOT_FOUND)


class Clients:
    def __init__(self, server: Server, grpc_port: int) -> None:
        self.server = server
        self.http = thttp.InferenceServerClient(server.url.removeprefix("http://"))
        self.grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def metrics(self) -> str:
        return httpx.get(f"{self.server.url}/metrics", headers=KEY, timeout=30).text


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    port = free_port()
    with run_server(tmp_path_factory.mktemp("config_stats"), "--grpc-port", str(port),
                    "--max-batch-size", "4", "--api-key", "k",
                    "--control-api-key", "c") as server:
        yield Clients(server, port)


def _images(module: Any, *seeds: int) -> Any:
    tensor = module.InferInput("image", [len(seeds)], "BYTES")
    tensor.set_data_from_numpy(np.asarray([encode(render_scene(s)[0]) for s in seeds],
                                          dtype=object))
    return tensor


def _raises(status: str, call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    assert raised.value.status() == status, raised.value
    return raised.value


def test_server_metadata_lists_one_set_of_extensions(clients: Clients) -> None:
    over_http = clients.http.get_server_metadata(headers=KEY)["extensions"]
    over_grpc = list(clients.grpc.get_server_metadata(headers=KEY).extensions)
    # Shared memory is off (SHM_KEY_PREFIXES empty): not claimed.
    assert over_http == over_grpc == [e for e in EXTENSIONS if e != "system_shared_memory"]
    assert {"model_configuration", "statistics", "logging", "binary_tensor_data",
            "model_repository", "parameters"} <= set(over_http)


def test_model_config_is_what_the_service_runs(clients: Clients) -> None:
    config = clients.http.get_model_config(MODEL, headers=KEY)
    assert config["name"] == MODEL and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 16  # MAX_BATCH_IMAGES: what one request may carry
    assert config["dynamic_batching"]["preferred_batch_size"] == [4]  # the engine's batch
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["instance_group"][0]["count"] >= 1
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] >= 0
    metadata = clients.http.get_model_metadata(MODEL, headers=KEY)
    shapes = {t["name"]: t["shape"] for t in metadata["inputs"]}
    inputs = {t["name"]: t for t in config["input"]}
    assert inputs["images"]["dims"] == shapes["images"][1:]  # less the batch dimension
    assert inputs["images"]["data_type"] == "TYPE_FP32"
    assert inputs["image"]["data_type"] == "TYPE_STRING"
    assert inputs["image"]["reshape"] == {"shape": []}
    assert all(t["optional"] for t in config["input"])
    assert {t["name"]: t["dims"] for t in config["output"]} == {
        "labels": [-1], "boxes": [-1, 4], "scores": [-1], "names": [-1]}
    # What perf_analyzer and model_analyzer read: every tensor in the metadata, and no
    # scheduler or policy they would take for one this service does not have.
    assert {t["name"] for t in config["input"]} <= {t["name"] for t in metadata["inputs"]}
    assert {t["name"] for t in config["output"]} <= {t["name"] for t in metadata["outputs"]}
    assert not {"sequence_batching", "ensemble_scheduling", "model_transaction_policy",
                "response_cache"} & set(config)

    assert clients.http.get_model_config(MODEL, "1", headers=KEY) == config
    over_grpc = clients.grpc.get_model_config(MODEL, headers=KEY).config
    assert over_grpc == json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert clients.grpc.get_model_config(MODEL, "1", headers=KEY, as_json=True)["config"][
        "max_batch_size"] == 16

    for version in ("7", "x"):
        _raises("404", clients.http.get_model_config, MODEL, version, headers=KEY)
        _raises(NOT_FOUND, clients.grpc.get_model_config, MODEL, version, headers=KEY)
    _raises("404", clients.http.get_model_config, "nope", headers=KEY)
    _raises(NOT_FOUND, clients.grpc.get_model_config, "nope", headers=KEY)
    _raises("401", clients.http.get_model_config, MODEL)


def _stats(clients: Clients) -> dict[str, Any]:
    [one] = clients.http.get_inference_statistics(MODEL, "1", headers=KEY)["model_stats"]
    return dict(one)


def _count(stats: dict[str, Any], duration: str) -> int:
    return int(stats["inference_stats"][duration]["count"])


def test_statistics_move_by_the_inferences_made(clients: Clients) -> None:
    before = _stats(clients)
    runs_before = metric_value(clients.metrics(), f'dfine_batch_size_count{{model="{MODEL}"}}')
    # (A copy of the headers: the HTTP client adds its own to the dict it is given.)
    clients.http.infer(MODEL, [_images(thttp, 1, 2, 3)], headers=dict(KEY))
    clients.grpc.infer(MODEL, [_images(tgrpc, 4, 5)], headers=KEY)
    bad = thttp.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.asarray([b"not an image"], dtype=object))
    _raises("400", clients.http.infer, MODEL, [bad], headers=dict(KEY))
    # A request is counted once its answer has gone: wait for the last one's.
    def counted() -> dict[str, Any]:
        stats = _stats(clients)
        return stats if _count(stats, "fail") > _count(before, "fail") else {}

    after = wait_until(counted, 30, "the failed request counted")

    assert after["name"] == MODEL and after["version"] == "1"
    assert _count(after, "success") - _count(before, "success") == 2
    assert _count(after, "fail") - _count(before, "fail") == 1
    assert after["inference_count"] - before["inference_count"] == 5
    for per_image in ("queue", "compute_input", "compute_output"):
        assert _count(after, per_image) - _count(before, per_image) == 5, per_image
    runs = after["execution_count"] - before["execution_count"]
    assert 2 <= runs <= 5  # the two requests' images, in batches of up to 4
    assert _count(after, "compute_infer") - _count(before, "compute_infer") == runs
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    sizes_before = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert sum(sizes.values()) - sum(sizes_before.values()) == runs
    assert sum(k * (v - sizes_before.get(k, 0)) for k, v in sizes.items()) == 5
    assert after["last_inference"] > before["last_inference"]
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}

    # They agree with /metrics, and the gRPC form with the REST one.
    text = clients.metrics()
    labels = f'{{model="{MODEL}",version="1"}}'
    assert metric_value(text, f"dfine_images_total{labels}") == after["inference_count"]
    assert metric_value(text, f"dfine_batch_size_count{labels}") - runs_before == runs
    over_grpc = clients.grpc.get_inference_statistics(MODEL, "1", headers=KEY, as_json=True)
    [one] = over_grpc["model_stats"]
    assert int(one["inference_count"]) == after["inference_count"]
    assert int(one["execution_count"]) == after["execution_count"]
    assert int(one["inference_stats"]["success"]["count"]) == _count(after, "success")
    assert int(one["inference_stats"]["fail"]["count"]) == _count(after, "fail")


def test_statistics_of_all_one_model_or_one_version(clients: Clients) -> None:
    every = clients.http.get_inference_statistics(headers=KEY)["model_stats"]
    assert [(s["name"], s["version"]) for s in every] == [(MODEL, "1")]
    assert {"inference_count", "execution_count", "last_inference", "batch_stats"} <= set(
        every[0])
    assert set(every[0]["inference_stats"]) == {
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
        "cache_hit", "cache_miss"}
    model = clients.http.get_inference_statistics(MODEL, headers=KEY)["model_stats"]
    assert [(s["name"], s["version"]) for s in model] == [(MODEL, "1")]
    over_grpc = clients.grpc.get_inference_statistics(headers=KEY).model_stats
    assert [(s.name, s.version) for s in over_grpc] == [(MODEL, "1")]
    assert [s.name for s in clients.grpc.get_inference_statistics(
        MODEL, headers=KEY).model_stats] == [MODEL]

    for version in ("7", "x"):
        _raises("404", clients.http.get_inference_statistics, MODEL, version, headers=KEY)
        _raises(NOT_FOUND, clients.grpc.get_inference_statistics, MODEL, version, headers=KEY)
    _raises("404", clients.http.get_inference_statistics, "nope", headers=KEY)
    _raises(NOT_FOUND, clients.grpc.get_inference_statistics, "nope", headers=KEY)
    _raises("401", clients.http.get_inference_statistics)


def _access_logged(server: Server, request_id: str) -> bool:
    return f"id={request_id}" in server.log()


def test_log_level_changes_at_run_time_behind_the_control_key(clients: Clients) -> None:
    http, rpc = clients.http, clients.grpc
    defaults = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                "log_verbose_level": 0, "log_format": "default"}
    assert http.get_log_settings(headers=KEY) == defaults
    assert rpc.get_log_settings(headers=KEY, as_json=True)["settings"]["log_info"] == {
        "bool_param": True}
    _raises("403", http.update_log_settings, {"log_info": False}, headers=KEY)
    _raises("401", http.update_log_settings, {"log_info": False})
    _raises(str(grpc.StatusCode.PERMISSION_DENIED), rpc.update_log_settings,
            {"log_info": False}, headers=KEY)
    for wrong in ({"log_info": "no"}, {"log_verbose_level": -1}, {"log_file": "/tmp/x"},
                  {"log_format": "ISO8601"}, {"log_level": "debug"}):
        _raises("422", http.update_log_settings, wrong, headers=CONTROL)
    _raises(str(grpc.StatusCode.INVALID_ARGUMENT), rpc.update_log_settings,
            {"log_file": "/tmp/x"}, headers=CONTROL)
    assert http.get_log_settings(headers=KEY) == defaults  # a refused change changes nothing

    try:
        # Without log_info, the access log (INFO) is silent; back on, it writes again. The
        # writer keeps the records' order: once the second is written, the first never will be.
        changed = http.update_log_settings({"log_info": False, "log_file": None},
                                           headers=CONTROL)
        assert changed == {**defaults, "log_info": False}
        quiet = httpx.get(f"{clients.server.url}/healthz", headers={**KEY, "x-request-id":
                                                                   "p30-quiet"})
        assert quiet.status_code == 200
        answer = rpc.update_log_settings({"log_info": True}, headers=CONTROL, as_json=True)
        assert answer["settings"]["log_info"] == {"bool_param": True}
        loud = httpx.get(f"{clients.server.url}/healthz", headers={**KEY, "x-request-id":
                                                                  "p30-loud"})
        assert loud.status_code == 200
        wait_until(lambda: _access_logged(clients.server, "p30-loud"), 30, "the access line")
        assert not _access_logged(clients.server, "p30-quiet")

        assert http.update_log_settings({"log_verbose_level": 1}, headers=CONTROL)[
            "log_verbose_level"] == 1
        verbose = rpc.get_log_settings(headers=KEY, as_json=True)["settings"]
        assert verbose["log_verbose_level"] == {"uint32_param": 1}
    finally:
        http.update_log_settings(defaults, headers=CONTROL)
    assert rpc.get_log_settings(headers=KEY).settings["log_verbose_level"].uint32_param == 0


def test_a_version_path_that_is_not_a_number_is_refused(clients: Clients) -> None:
    response = httpx.get(f"{clients.server.url}/v2/models/{MODEL}/versions/1x/stats",
                         headers=KEY)
    assert response.status_code == 404 and "error" in response.json()


@pytest.fixture(scope="module")
def two_frontends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    port = free_port()
    with run_server(tmp_path_factory.mktemp("two_frontends"), "--grpc-port", str(port),
                    "--frontends", "2", "--api-key", "k", "--control-api-key", "c") as server:
        yield Clients(server, port)


def test_statistics_count_every_front_end(two_frontends: Clients) -> None:
    """FRONTENDS=2: whichever front end answers, the statistics are the service's."""
    clients = two_frontends
    before = _stats(clients)["inference_count"]
    for _ in range(4):  # new connections: the kernel spreads them over the front ends
        thttp.InferenceServerClient(clients.server.url.removeprefix("http://")).infer(
            MODEL, [_images(thttp, 1)], headers=dict(KEY))
    wait_until(lambda: _stats(clients)["inference_count"] - before == 4, 30,
               "four images counted")
    for _ in range(4):
        assert _stats(clients)["inference_count"] - before == 4


def test_log_settings_are_the_services_whichever_front_end_takes_a_change(
        two_frontends: Clients) -> None:
    """FRONTENDS=2: a change through one front end is answered once every process applies
    it: the other front end reads it at once and logs by it; a front end started again
    follows it; the engine process logs by it too."""
    server = two_frontends.server
    defaults = {"log_info": True, "log_warning": True, "log_error": True,
                "log_verbose_level": 0}
    control = {**CONTROL, "Content-Type": "application/json"}

    def change(connection: Any, **settings: Any) -> dict[str, Any]:
        status, body = ask(connection, "POST", "/v2/logging", json.dumps(settings).encode(),
                           control)
        assert status == 200, body
        return dict(json.loads(body))

    def read(connection: Any) -> dict[str, Any]:
        status, body = ask(connection, "GET", "/v2/logging", headers=KEY)
        assert status == 200, body
        return dict(json.loads(body))

    def healthz(connection: Any, request_id: str) -> None:
        assert ask(connection, "GET", "/healthz", headers={**KEY, "x-request-id": request_id}
                   )[0] == 200

    try:
        connections = connections_to_each(server, frontend_pids(server))
        first, second = connections.values()
        for changer, other, tag in ((first, second, "a"), (second, first, "b")):
            assert change(changer, log_info=False)["log_info"] is False
            assert read(other)["log_info"] is False
            healthz(other, f"p30-quiet-{tag}")
            assert change(changer, log_info=True)["log_info"] is True
            assert read(other)["log_info"] is True
            # The same process writes both lines, in order: the second written, the first
            # never will be.
            healthz(other, f"p30-loud-{tag}")
            wait_until(partial(_access_logged, server, f"p30-loud-{tag}"), 30, "the access line")
            assert not _access_logged(server, f"p30-quiet-{tag}")
        assert read(first) == read(second) == {**read(first), **defaults}

        # A front end started again takes the service's settings from the engine process,
        # whose own "front end ... connected" line (INFO) is not written meanwhile.
        assert change(first, log_info=False, log_verbose_level=0)["log_info"] is False
        victim = list(connections)[1]
        for connection in connections.values():
            connection.close()
        os.kill(victim, signal.SIGKILL)

        def replaced_pids() -> set[int]:
            pids = frontend_pids(server)
            return pids if len(pids) == 2 and victim not in pids else set()

        pids = wait_until(replaced_pids, 60, "a new front end")
        replaced = next(iter(pids - set(connections)))
        fresh = connections_to_each(server, pids)
        assert read(fresh[replaced])["log_info"] is False
        assert re.search(r"\(pid \d+\) connected", server.log())  # the line, at start
        assert f"(pid {replaced}) connected" not in server.log()
        for connection in fresh.values():
            connection.close()
    finally:
        httpx.post(f"{server.url}/v2/logging", json=defaults, headers=CONTROL,
                   timeout=30).raise_for_status()
