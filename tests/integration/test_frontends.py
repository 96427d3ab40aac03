"""FRONTENDS=2: two front-end processes and one engine process, for real (``python -m app
--frontends 2`` with the shipped model on the CPU), driven over real sockets. Each test reaches
a chosen front end by keeping a connection open to the shared port and finding, through /proc,
which process holds its other end."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench.stats import metric_value
from tests.helpers import DEFAULT_MODEL, Server, encode, render_scene, run_server, wait_until

JPEG = {"Content-Type": "image/jpeg"}
IMAGE = encode(render_scene(3)[0])


# --- the processes ------------------------------------------------------------------------


def children(pid: int) -> dict[int, str]:
    """The supervisor's children and their roles (engine, frontend)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            roles = [e.split(b"=", 1)[1].decode() for e in environ
                     if e.startswith(b"DFINE_ROLE=")]
            if roles:
                found[int(child)] = roles[0]
    return found


def engine_pid(server: Server) -> int:
    return wait_until(lambda: next((p for p, r in children(server.process.pid).items()
                                    if r == "engine"), None), 30, "the engine process")


def frontend_pids(server: Server) -> set[int]:
    return {p for p, r in children(server.process.pid).items() if r == "frontend"}


def _socket_inode(local_port: int, server_port: int) -> str | None:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if (int(local.split(":")[1], 16) == server_port
                and int(remote.split(":")[1], 16) == local_port):
            return inode
    return None


def open_files(pid: int) -> dict[Path, str]:
    """A process's descriptors and what each points to (one closed meanwhile is left out)."""
    found = {}
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found[fd] = os.readlink(fd)
    return found


def owner(connection: http.client.HTTPConnection, pids: set[int]) -> int | None:
    """The process (of ``pids``) holding the server's end of ``connection``."""
    assert connection.sock is not None
    inode = _socket_inode(connection.sock.getsockname()[1], connection.port)
    for pid in pids:
        if f"socket:[{inode}]" in open_files(pid).values():
            return pid
    return None


def connections_to_each(server: Server, pids: set[int]) -> dict[int, http.client.HTTPConnection]:
    """One kept-alive connection to each front end of ``pids`` (opened until each has one)."""
    port = int(server.url.rsplit(":", 1)[1])
    found: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []
    deadline = time.monotonic() + 30
    while set(found) != pids:
        assert time.monotonic() < deadline, f"no connection reached {pids - set(found)}"
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/healthz")  # accepted and answered: the owner is known
        connection.getresponse().read()
        pid = owner(connection, pids)
        if pid is not None and pid not in found:
            found[pid] = connection
        else:
            spare.append(connection)
    for connection in spare:
        connection.close()
    return found


def ask(connection: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("frontends"), "--frontends", "2",
                    "--max-batch-size", "8", "--log-level", "info",
                    ready_timeout_s=120) as server:
        yield server


# --- tests --------------------------------------------------------------------------------


def test_both_front_ends_answer_and_the_metrics_are_one_view(service: Server) -> None:
    pids = frontend_pids(service)
    assert len(pids) == 2
    connections = connections_to_each(service, pids)
    before = {pid: ask(c, "GET", "/metrics")[1].decode() for pid, c in connections.items()}
    per_connection = 6

    def send(connection: http.client.HTTPConnection, statuses: list[int]) -> None:
        for _ in range(per_connection):
            statuses.append(ask(connection, "POST", "/detect", IMAGE, JPEG)[0])

    statuses: list[int] = []
    threads = [threading.Thread(target=send, args=(c, statuses)) for c in connections.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * (2 * per_connection)
    selector = 'dfine_requests_total{endpoint="/detect",status="200"}'
    for pid, connection in connections.items():  # each front end shows the whole service
        after = ask(connection, "GET", "/metrics")[1].decode()
        assert metric_value(after, selector) - metric_value(before[pid], selector) \
            == 2 * per_connection
        assert metric_value(after, "dfine_images_total") \
            - metric_value(before[pid], "dfine_images_total") == 2 * per_connection
    rss = sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")
              for p in [service.process.pid, *children(service.process.pid)])
    assert metric_value(after, "process_resident_memory_bytes") >= 0.8 * rss


def test_the_service_memory_bound_is_stated_once_for_every_process(service: Server) -> None:
    lines = [line for line in service.log().splitlines()
             if "across the service: 2 front ends" in line]
    assert lines, service.log()[-3000:]


def test_batches_are_formed_from_both_front_ends_images(service: Server) -> None:
    connections = list(connections_to_each(service, frontend_pids(service)).values())
    port = connections[0].port
    before = ask(connections[0], "GET", "/metrics")[1].decode()
    clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(24)]
    statuses: list[int] = []

    def send(connection: http.client.HTTPConnection) -> None:
        for _ in range(4):
            statuses.append(ask(connection, "POST", "/detect", IMAGE, JPEG)[0])

    threads = [threading.Thread(target=send, args=(c,)) for c in [*connections, *clients]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) == {200}
    after = ask(connections[0], "GET", "/metrics")[1].decode()
    images = metric_value(after, "dfine_images_total") - metric_value(before, "dfine_images_total")
    runs = (metric_value(after, "dfine_batch_size_count")
            - metric_value(before, "dfine_batch_size_count"))
    assert images == len(statuses)
    assert images / runs > 1, (images, runs)


def test_a_version_loaded_or_unloaded_is_seen_by_every_front_end_at_once(
        tmp_path: Path) -> None:
    root = tmp_path / "repository"
    for name in ("shapes", "extra"):
        (root / name / "1").mkdir(parents=True)
        os.link(DEFAULT_MODEL, root / name / "1" / "model.onnx")
    with run_server(tmp_path, "--frontends", "2", "--model-repository", str(root),
                    "--model-control", "explicit", "--default-model", "shapes",
                    ready_timeout_s=120) as server:
        connections = connections_to_each(server, frontend_pids(server))
        first, second = connections.values()
        assert ask(second, "GET", "/v2/models/extra/ready")[0] == 200
        status, body = ask(first, "POST", "/v2/repository/models/extra/unload")
        assert status == 200, body
        assert ask(second, "GET", "/v2/models/extra/ready")[0] != 200  # no wait: at once
        assert ask(second, "POST", "/detect?model=extra", IMAGE, JPEG)[0] == 404
        status, body = ask(second, "POST", "/v2/repository/models/extra/load")
        assert status == 200, body
        assert ask(first, "GET", "/v2/models/extra/ready")[0] == 200
        status, body = ask(first, "POST", "/detect?model=extra", IMAGE, JPEG)
        assert status == 200, body


def test_a_front_end_that_dies_is_replaced_and_leaves_no_slot_behind(service: Server) -> None:
    engine = engine_pid(service)
    connections = connections_to_each(service, frontend_pids(service))
    victim, survivor = connections
    pools = {fd.stat().st_ino for fd, target in open_files(victim).items()
             if target.startswith("/memfd:dfine-")}
    assert pools

    def mapped_by_engine() -> set[int]:
        inodes = set()
        for line in Path(f"/proc/{engine}/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:dfine-"):
                inodes.add(int(fields[4]))
        return inodes

    assert pools <= mapped_by_engine()
    statuses: list[int | str] = []

    def busy() -> None:  # requests in flight on the victim when it dies
        connection = connections[victim]
        with_error = False
        while not with_error:
            try:
                statuses.append(ask(connection, "POST", "/detect", IMAGE, JPEG)[0])
            except (OSError, http.client.HTTPException):
                with_error = True

    thread = threading.Thread(target=busy)
    thread.start()
    wait_until(lambda: len(statuses) >= 2, 30, "requests answered by the victim")
    os.kill(victim, signal.SIGKILL)
    thread.join(30)
    wait_until(lambda: len(frontend_pids(service) - {victim}) == 2, 60, "a new front end")
    wait_until(lambda: not pools & mapped_by_engine(), 30,
               "the engine letting go of the dead front end's slots")
    assert ask(connections[survivor], "POST", "/detect", IMAGE, JPEG)[0] == 200
    text = ask(connections[survivor], "GET", "/metrics")[1].decode()
    assert metric_value(text, "dfine_queue_depth") == 0


def test_while_the_engine_process_is_away_every_front_end_answers_503(service: Server) -> None:
    engine = engine_pid(service)
    connections = connections_to_each(service, frontend_pids(service))
    os.kill(engine, signal.SIGKILL)
    wait_until(lambda: all([ask(c, "GET", "/readyz")[0] == 503 for c in connections.values()]),
               30, "readiness to fail")
    # Before it is back: detections are refused, not lost or hung.
    restarted = wait_until(lambda: next((p for p, r in children(service.process.pid).items()
                                         if r == "engine" and p != engine), None), 60,
                           "a new engine process")
    for connection in connections.values():
        status, body = ask(connection, "POST", "/detect", IMAGE, JPEG)
        assert status in (200, 503), body
        if status == 503:
            assert json.loads(body)["error"]["code"] == "not_ready"
    # Every connection asked at each try: none idles past uvicorn's keep-alive (5 s).
    wait_until(lambda: all([ask(c, "GET", "/readyz")[0] == 200 for c in connections.values()]),
               120, "readiness again")
    for connection in connections.values():
        assert ask(connection, "POST", "/detect", IMAGE, JPEG)[0] == 200
    assert restarted != engine


def test_sigterm_drains_every_process_without_losing_an_admitted_request(
        tmp_path: Path) -> None:
    with run_server(tmp_path, "--frontends", "2", "--instances", "1", "--max-batch-size", "1",
                    ready_timeout_s=120) as server:
        connections = connections_to_each(server, frontend_pids(server))
        port = next(iter(connections.values())).port
        clients = [*connections.values(),
                   *(http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                     for _ in range(22))]
        results: list[int | str] = []

        def send(connection: http.client.HTTPConnection) -> None:
            try:
                results.append(ask(connection, "POST", "/detect", IMAGE, JPEG)[0])
            except (OSError, http.client.HTTPException) as exc:
                results.append(repr(exc))

        threads = [threading.Thread(target=send, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        # Queued in the engine process (one image a run): admitted, and not done yet.
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        wait_until(lambda: metric_value(ask(probe, "GET", "/metrics")[1].decode(),
                                        "dfine_queue_depth") >= 8, 60, "a queue")
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert server.process.wait(60) == 0
        assert all(status == 200 for status in results), results
        log = server.log()
        assert log.index("front end") < log.rindex("engine process stopping"), log[-3000:]


def test_grpc_is_served_by_every_front_end_on_one_port_and_answers_as_the_model_does(
        tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    import tritonclient.grpc as tgrpc

    from app.bench.cli import free_port

    port = free_port()
    with run_server(tmp_path, "--frontends", "2", "--grpc-port", str(port),
                    ready_timeout_s=120) as server:
        def listeners() -> int:
            lines = [line.split() for table in ("tcp", "tcp6")  # gRPC's may be IPv6-mapped
                     for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]
            return len([f for f in lines if int(f[1].rsplit(":", 1)[1], 16) == port
                        and f[3] == "0A"])

        # One listening socket a front end (SO_REUSEPORT); the second may start a little later.
        wait_until(lambda: listeners() == 2, 60, "both front ends listening for gRPC")
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready()
        # A tensor the client preprocessed crosses to the engine in a slot, unchanged.
        pixels = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
        sizes = np.asarray([[640, 480]], np.int64)
        images = tgrpc.InferInput("images", list(pixels.shape), "FP32")
        images.set_data_from_numpy(pixels)
        target = tgrpc.InferInput("orig_target_sizes", [1, 2], "INT64")
        target.set_data_from_numpy(sizes)
        got = client.infer(DEFAULT_MODEL.stem, [images, target])
        session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
        labels, boxes, scores = session.run(None, {"images": pixels, "orig_target_sizes": sizes})
        assert (got.as_numpy("labels")[:, :10] == labels[:, :10]).all()
        np.testing.assert_allclose(got.as_numpy("scores"), scores, atol=1e-4)
        np.testing.assert_allclose(got.as_numpy("boxes"), boxes, atol=1e-2)
        assert server.process.poll() is None


def test_a_new_version_rolls_in_under_load_with_no_failed_request(tmp_path: Path) -> None:
    """Requests a front end admitted on the old version finish on it (the engine keeps it
    while a front end's pool is bound to it), and a version's rewritten file reaches every
    front end (a new copy, told apart by its serial)."""
    import asyncio

    from app.bench.swap import swap_under_load

    root = tmp_path / "repository"
    (root / "live" / "1").mkdir(parents=True)
    os.link(DEFAULT_MODEL, root / "live" / "1" / "model.onnx")
    with run_server(tmp_path, "--frontends", "2", "--model-repository", str(root),
                    "--model-control", "poll", "--repository-poll-s", "0.3",
                    ready_timeout_s=120) as server:
        report = asyncio.run(swap_under_load(server.url, root, "live", DEFAULT_MODEL, 1, 2,
                                             clients=16, steady_s=2, after_s=1))
        assert report.not_ok == {}, report
        assert report.requests > 30
        connections = connections_to_each(server, frontend_pids(server))
        for connection in connections.values():
            status, body = ask(connection, "POST", "/detect", IMAGE, JPEG)
            assert status == 200 and json.loads(body)["version"] == 2, body
        # Version 2 rewritten with other class names: every front end answers with them.
        (root / "live" / "labels.txt").write_text("disc\nbox\nwedge\n")
        for connection in connections.values():
            wait_until(lambda c=connection: "disc" in ask(c, "GET", "/model?model=live")[1]
                       .decode(), 60, "the rewritten version on this front end")


def test_a_request_whose_other_images_are_cancelled_leaks_no_slot(service: Server) -> None:
    """/v2 with a corrupt image among good ones: the others' runs are cancelled, some in the
    same read as they were sent. Every run is answered, so the slots all come back: later
    requests still get places (they got 503 for good once enough had leaked; whether a run
    and its cancel share a read is timing, checked deterministically in
    tests/unit/test_link.py)."""
    import base64

    good = base64.b64encode(IMAGE).decode()
    bad = base64.b64encode(b"\xff\xd8 not a jpeg").decode()
    model = DEFAULT_MODEL.stem
    body = json.dumps({"inputs": [{"name": "image", "shape": [16], "datatype": "BYTES",
                                   "data": [good] * 15 + [bad]}]}).encode()
    connections = list(connections_to_each(service, frontend_pids(service)).values())
    for k in range(30):
        status, answer = ask(connections[k % 2], "POST", f"/v2/models/{model}/infer", body,
                             {"Content-Type": "application/json"})
        assert status == 400, answer
    whole = json.dumps({"inputs": [{"name": "image", "shape": [16], "datatype": "BYTES",
                                    "data": [good] * 16}]}).encode()
    for connection in connections:
        status, answer = ask(connection, "POST", f"/v2/models/{model}/infer", whole,
                             {"Content-Type": "application/json"})
        assert status == 200, answer


def test_client_tensors_take_one_slot_each(service: Server) -> None:
    """Preprocessed FP32 inputs, 16 images a request, 3 requests at once: each image is copied
    into its own slot (it took two before, and half the admitted requests got 503)."""
    import numpy as np

    pixels = np.random.default_rng(1).random((16, 3, 320, 320), dtype=np.float32)
    sizes = np.tile(np.asarray([[640, 480]], np.int64), (16, 1))
    body = json.dumps({"inputs": [
        {"name": "images", "shape": list(pixels.shape), "datatype": "FP32",
         "data": pixels.ravel().tolist()},
        {"name": "orig_target_sizes", "shape": [16, 2], "datatype": "INT64",
         "data": sizes.ravel().tolist()}]}).encode()
    port = int(service.url.rsplit(":", 1)[1])
    statuses: list[int] = []

    def send() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        statuses.append(ask(connection, "POST", f"/v2/models/{DEFAULT_MODEL.stem}/infer", body,
                            {"Content-Type": "application/json"})[0])

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200, 200, 200]


def test_an_images_tiles_cross_to_the_engine_process_together_and_leak_no_slot(
        service: Server) -> None:
    """A tiled request through a front end: its tiles go to the engine process in one message
    and are queued there under one lock (batches of up to 8, not one run each), answered as in
    one process; a client that leaves mid-request leaves every slot behind it free."""
    import cv2

    image = render_scene(5)[0]
    big = encode(cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2)))
    url = f"{service.url}/detect?tile=640"
    answer = json.loads(urllib_post(url, big))
    tiling = answer["tiling"]
    assert tiling["engine_images"] == len(tiling["tiles"]) + 1 > 8
    assert tiling["engine_runs"] < tiling["engine_images"]
    assert answer["detections"]
    port = int(service.url.rsplit(":", 1)[1])
    for _ in range(6):  # clients that leave while their tiles are queued or running
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/detect?tile=640", big, JPEG)
        connection.sock.close()
        connection.close()
    # Every slot comes back: requests of as many images as a front end admits still pass.
    for _ in range(4):
        assert json.loads(urllib_post(url, big))["tiling"]["engine_images"] == (
            tiling["engine_images"])


def urllib_post(url: str, body: bytes) -> bytes:
    import urllib.request

    request = urllib.request.Request(url, body, JPEG, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        data: bytes = response.read()
        return data
