"""Scaling out, simulated here: three service processes behind a real nginx (Debian's) as the
load balancer, one of them sent SIGTERM under load, as Kubernetes does to a pod that goes away.
No accepted request may be lost: the draining process finishes what it admitted and refuses
the rest with 503 not_ready, which nginx retries on another replica."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import httpx

from tests.deploy.conftest import require
from tests.helpers import encode, free_port, metric, render_scene, run_server, wait_until

NGINX = """
daemon off;
user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  client_max_body_size 20m;
  upstream dfine {{
{servers}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://dfine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # A draining replica answers 503 not_ready, a stopped one refuses the connection:
      # either way the request goes to another replica (POST included).
      proxy_next_upstream error timeout http_503 non_idempotent;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
"""


def test_a_replica_stopped_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    image = encode(render_scene(70)[0])
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(run_server(tmp_path, "--instances", "1"))
                    for _ in range(3)]
        port = free_port()
        servers = "\n".join(f"    server {r.url.removeprefix('http://')} max_fails=0;"
                            for r in replicas)
        (tmp_path / "nginx.conf").write_text(NGINX.format(root=tmp_path, servers=servers,
                                                          port=port))
        nginx = subprocess.Popen([require("nginx"), "-c", str(tmp_path / "nginx.conf"),
                                  "-p", str(tmp_path)], stderr=subprocess.PIPE)
        stack.callback(lambda: (nginx.terminate(), nginx.wait(10)))
        url = f"http://127.0.0.1:{port}"

        def nginx_answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            return False

        wait_until(nginx_answers, 30, "nginx answering")
        statuses: Counter[int] = Counter()
        stop = threading.Event()
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    status = http.post(f"{url}/detect", content=image,
                                       headers={"Content-Type": "image/jpeg"}).status_code
                    with lock:
                        statuses[status] += 1

        def answered() -> int:
            with lock:
                return sum(statuses.values())

        threads = [threading.Thread(target=client) for _ in range(12)]
        for thread in threads:
            thread.start()
        leaving = replicas[1]
        served = 'dfine_requests_total{endpoint="/detect",status="200"}'
        # Under load, the leaving replica taking its part, before it goes.
        wait_until(lambda: metric(leaving.url, served) >= 10, 60,
                   "10 requests served by the replica that leaves")
        leaving.process.send_signal(signal.SIGTERM)
        assert leaving.process.wait(30) == 0  # drained and exited cleanly
        after_leaving = answered()
        wait_until(lambda: answered() - after_leaving >= 50, 60,
                   "50 more answers from the replicas left")
        stop.set()
        for thread in threads:
            thread.join()
    assert statuses[200] > 60 and set(statuses) == {200}, statuses
