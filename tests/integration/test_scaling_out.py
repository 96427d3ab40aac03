"""Scaling out, simulated here: three service processes behind a real nginx (Debian's) as the
load balancer, one of them sent SIGTERM under load, as Kubernetes does to a pod that goes away.
No accepted request may be lost: the draining process finishes what it admitted and refuses
the rest with 503 not_ready, which nginx retries on another replica."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from app.bench.stats import metric_value
from tests.deploy.conftest import require
from tests.helpers import encode, free_port, render_scene, run_server

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
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
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

        threads = [threading.Thread(target=client) for _ in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        leaving = replicas[1]
        served_before = metric_value(httpx.get(f"{leaving.url}/metrics").text,
                                     'dfine_requests_total{endpoint="/detect",status="200"}')
        leaving.process.send_signal(signal.SIGTERM)
        assert leaving.process.wait(30) == 0  # drained and exited cleanly
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join()
    assert served_before > 0  # it took part before it left
    assert statuses[200] > 50 and set(statuses) == {200}, statuses
