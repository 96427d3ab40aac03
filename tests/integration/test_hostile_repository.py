"""Hostile clients of the model repository (issue 25, item 4), on real servers in explicit
mode: model names that would leave the repository (over REST with the raw paths an attacker
sends, and over gRPC) are refused with a clear 4xx, load nothing, and leave the served
version's answers, the index and readiness as they were; and the calls that change what is
served take a key of their own (CONTROL_API_KEY), which the inference key does not replace."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from app.bench.cli import free_port
from app.bench.stats import metric_value
from tests import onnx_models
from tests.helpers import DEFAULT_MODEL, Server, encode, render_scene, run_server

IMAGE = encode(render_scene(7)[0])
API_KEY, CONTROL_KEY = "inference-key", "control-key"
LOADS = 'dfine_model_events_total{model="shapes",event="load"}'
SMALL = ("--model-control", "explicit", "--max-batch-size", "1", "--max-loaded-models", "2")


@dataclass
class Served:
    server: Server
    grpc: str  # host:port
    repository: Path
    outside: Path  # beside the repository, a model of its own under the same name


def _layout(base: Path) -> tuple[Path, Path]:
    """``repository/shapes/1`` (the shipped model) and a hidden model directory, which the
    naming rule keeps out; beside it ``outside/shapes/1``, a model with other answers."""
    repository, outside = base / "repository", base / "outside"
    for version_dir in (repository / "shapes" / "1", repository / ".hidden" / "1"):
        version_dir.mkdir(parents=True)
        os.link(DEFAULT_MODEL, version_dir / "model.onnx")
    (outside / "shapes" / "1").mkdir(parents=True)
    onnx_models.official(outside / "shapes" / "1" / "model.onnx")
    return repository, outside


def _serve(base: Path, *args: str) -> Iterator[Served]:
    repository, outside = _layout(base)
    port = free_port()
    with run_server(base, "--model-repository", str(repository), "--grpc-port", str(port),
                    *SMALL, *args) as server:
        yield Served(server, f"127.0.0.1:{port}", repository, outside)


@pytest.fixture(scope="module")
def open_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """No key at all: control calls are open, so only the names are on trial."""
    yield from _serve(tmp_path_factory.mktemp("names"))


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Both keys; OPEN_PATHS lists a control path and the index (reads may be opened, control
    calls never)."""
    yield from _serve(tmp_path_factory.mktemp("keys"), "--api-key", API_KEY,
                      "--control-api-key", CONTROL_KEY, "--open-paths",
                      "/healthz,/readyz,/metrics,/v2/repository/index,"
                      "/v2/repository/models/shapes/unload")


def raw(server: Server, method: str, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], Any]:
    """One request with ``path`` sent byte for byte (httpx would normalise ``..``)."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                json.loads(body) if body else None)
    finally:
        connection.close()


@dataclass(frozen=True)
class Snapshot:
    """What an attack must leave as it was."""

    detections: list[dict[str, Any]]
    index: list[dict[str, Any]]
    loads: float


def snapshot(served: Served, headers: dict[str, str] | None = None) -> Snapshot:
    url = served.server.url
    detected = httpx.post(f"{url}/detect?model=shapes", content=IMAGE, timeout=60,
                          headers={"Content-Type": "image/jpeg", **(headers or {})})
    assert detected.status_code == 200, detected.text
    assert detected.json()["detections"], "the shipped model sees the scene's shapes"
    index = httpx.post(f"{url}/v2/repository/index", headers=headers, timeout=30)
    assert index.status_code == 200, index.text
    loads = metric_value(httpx.get(f"{url}/metrics", timeout=30).text, LOADS)
    return Snapshot(detected.json()["detections"], index.json(), loads)


def assert_untouched(served: Served, before: Snapshot,
                     headers: dict[str, str] | None = None) -> None:
    assert httpx.get(f"{served.server.url}/readyz", timeout=30).status_code == 200
    assert snapshot(served, headers) == before


# --- names, over REST --------------------------------------------------------------------

A300 = "a" * 300
REFUSED_PATHS = [
    # (method, raw path, status): 422 for a name that is not a model name; 404 where an
    # encoded slash makes the path one that no route has (uvicorn decodes %2F before routing).
    ("POST", "/v2/repository/models/../load", 422),  # curl --path-as-is, as the attacker sent
    ("POST", "/v2/repository/models/%2e%2e/load", 422),
    ("POST", "/v2/repository/models/%2E%2E/unload", 422),
    ("POST", "/v2/repository/models/./load", 422),
    ("POST", "/v2/repository/models/.hidden/load", 422),  # in the repository, but not a name
    ("POST", "/v2/repository/models/shapes%0A/load", 422),  # "$" would let this by
    ("POST", "/v2/repository/models/shapes%00/load", 422),
    ("POST", f"/v2/repository/models/{A300}/load", 422),  # 500 before (name too long)
    ("POST", f"/v2/repository/models/{A300}/unload", 422),
    ("POST", "/v2/repository/models/%2Fetc/load", 404),
    ("POST", "/v2/repository/models/..%2Foutside%2Fshapes/load", 404),
    ("POST", "/v2/repository/models/ghost/load", 404),  # well-formed, absent
    ("GET", "/v2/models/%2e%2e", 422),
    ("GET", f"/v2/models/{A300}/versions/1", 422),
    ("POST", "/v2/models/%2e%2e/infer", 422),
    ("GET", "/v2/models/%2e%2e/ready", 404),  # the readiness routes ask known() first
    ("POST", "/detect?model=..", 422),
    ("POST", "/detect?model=%2Fetc", 422),
    ("GET", "/model?model=..", 422),
]


@pytest.mark.parametrize(("method", "path", "status"), REFUSED_PATHS,
                         ids=[f"{m} {p[:60]}" for m, p, _ in REFUSED_PATHS])
def test_a_name_that_is_not_a_model_name_is_refused_over_rest_and_loads_nothing(
        open_service: Served, method: str, path: str, status: int) -> None:
    before = snapshot(open_service)
    got, _, body = raw(open_service.server, method, path)
    assert got == status, body
    is_v2 = path.startswith("/v2/")
    message = body["error"] if is_v2 else body["error"]["message"]
    assert isinstance(message, str)  # the protocol's form: {"error": "<message>"} on /v2
    if status == 422:
        assert "is not a model name" in message
    assert_untouched(open_service, before)


def test_a_model_directory_linked_out_of_the_repository_is_not_loaded(
        open_service: Served) -> None:
    before = snapshot(open_service)
    linked = open_service.repository / "linked"
    linked.symlink_to(open_service.outside / "shapes", target_is_directory=True)
    try:
        response = httpx.post(f"{open_service.server.url}/v2/repository/models/linked/load",
                              timeout=60)
        assert response.status_code == 400, response.text
        assert "link to outside the model repository" in response.json()["error"]
        assert httpx.get(f"{open_service.server.url}/readyz").status_code == 200
        index = {e["name"]: e for e in httpx.post(
            f"{open_service.server.url}/v2/repository/index", timeout=30).json()}
        assert index["linked"]["state"] == "UNAVAILABLE"  # the operator sees why
        assert "link to outside" in index["linked"]["reason"]
        detected = httpx.post(f"{open_service.server.url}/detect?model=linked", content=IMAGE,
                              headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert detected.status_code == 404
    finally:
        linked.unlink()
    assert snapshot(open_service).detections == before.detections


def test_a_model_directory_with_no_version_does_not_hold_readiness(open_service: Served
                                                                   ) -> None:
    """A plain-named directory with nothing to serve (lost+found on a mounted volume): the
    load fails and readiness stays 200 (before, it waited for the model until unloaded)."""
    before = snapshot(open_service)
    (open_service.repository / "lost_found").mkdir()
    response = httpx.post(
        f"{open_service.server.url}/v2/repository/models/lost_found/load", timeout=60)
    assert response.status_code == 400 and "no version to serve" in response.json()["error"]
    assert httpx.get(f"{open_service.server.url}/readyz").status_code == 200
    assert snapshot(open_service).detections == before.detections


# --- names, over gRPC --------------------------------------------------------------------

def _grpc_status(call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The status ``call(*args, **kwargs)`` is refused with."""
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return str(raised.value.status())


def test_names_that_leave_the_repository_are_refused_over_grpc(open_service: Served) -> None:
    before = snapshot(open_service)
    client = tgrpc.InferenceServerClient(open_service.grpc)
    invalid = str(grpc.StatusCode.INVALID_ARGUMENT)
    # The attack: an absolute path replaced the served shapes version 1 with this.
    outside = str(open_service.outside / "shapes")
    for name in (outside, "/etc", "..", ".", A300, "shapes/../shapes", "shapes\n"):
        for call in (client.load_model, client.unload_model, client.get_model_metadata):
            assert _grpc_status(call, name) == invalid, (call, name)
    assert _grpc_status(client.load_model, "ghost") == str(grpc.StatusCode.NOT_FOUND)
    assert client.is_server_ready()
    assert_untouched(open_service, before)


# --- the control key ---------------------------------------------------------------------

def _post(served: Served, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{served.server.url}{path}", headers=headers, timeout=60)


@pytest.mark.parametrize("call", ["unload", "load"])
@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"X-API-Key": "wrong"}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"X-API-Key": API_KEY}, 403),
    ({"Authorization": f"Bearer {API_KEY}"}, 403),
])
def test_only_the_control_key_loads_and_unloads(
        keyed: Served, call: str, headers: dict[str, str], status: int) -> None:
    """The inference key is a 403, no key or a wrong one a 401 (with its scheme), whatever
    OPEN_PATHS lists (it lists the unload path here); the model serves on."""
    inference = {"X-API-Key": API_KEY}
    before = snapshot(keyed, inference)
    response = _post(keyed, f"/v2/repository/models/shapes/{call}", headers)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str)
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="dfine-serve"'
    else:
        assert "CONTROL_API_KEY" in response.json()["error"]
    assert_untouched(keyed, before, inference)


def test_the_control_key_swaps_models_and_opens_nothing_else(keyed: Served) -> None:
    inference, control = {"X-API-Key": API_KEY}, {"Authorization": f"Bearer {CONTROL_KEY}"}
    assert _post(keyed, "/v2/repository/models/shapes/unload", control).status_code == 200
    gone = httpx.post(f"{keyed.server.url}/detect?model=shapes", content=IMAGE, timeout=30,
                      headers={"Content-Type": "image/jpeg", **inference})
    assert gone.status_code == 404
    assert _post(keyed, "/v2/repository/models/shapes/load", control).status_code == 200
    assert snapshot(keyed, inference).detections
    # A bad name with the control key: the name is refused, not the key.
    assert raw(keyed.server, "POST", "/v2/repository/models/../load", control)[0] == 422
    # The control key does not open inference nor reads.
    for method, path in (("POST", "/detect"), ("GET", "/v2/models/shapes"),
                         ("GET", "/model")):
        assert raw(keyed.server, method, path, {"X-API-Key": CONTROL_KEY})[0] == 401, path
    # OPEN_PATHS still opens the reads it lists.
    assert _post(keyed, "/v2/repository/index").status_code == 200


def test_only_the_control_key_loads_and_unloads_over_grpc(keyed: Served) -> None:
    """Needs app/api/grpc_service.py to call keys.authorize_control in RepositoryModelLoad
    and RepositoryModelUnload (the gRPC side of the same rule)."""
    client = tgrpc.InferenceServerClient(keyed.grpc)
    for call in (client.load_model, client.unload_model):
        assert _grpc_status(call, "shapes", headers={"x-api-key": API_KEY}) == str(
            grpc.StatusCode.PERMISSION_DENIED)
        assert _grpc_status(call, "shapes", headers={"x-api-key": "wrong"}) == str(
            grpc.StatusCode.UNAUTHENTICATED)
    assert client.is_model_ready("shapes", headers={"x-api-key": API_KEY})
    client.load_model("shapes", headers={"x-api-key": CONTROL_KEY})
    assert client.is_model_ready("shapes", headers={"x-api-key": API_KEY})
