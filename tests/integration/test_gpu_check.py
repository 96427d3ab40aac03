"""The prepared GPU check, tried on the CPU so that a GPU lease is never spent on a typo: its
preflight runs the bucket path and writes its report; the targets fail without CUDA or
graphs, as they must."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "docs" / "performance"


def test_preflight_runs_the_bucket_path_and_reports_each_bucket(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PROVIDERS": "cpu", "PY": sys.executable,
           "EXTRA_ARGS": "--batch-buckets 1,2 --max-batch-size 2"}
    done = subprocess.run(["bash", str(SCRIPTS / "gpu-check.sh"), "preflight"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "preflight: PASS" in done.stdout
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert [r["precision"] for r in report] == ["fp32", "fp16"]
    for result in report:
        buckets = result["engine"]["buckets"]
        assert [b["size"] for b in buckets] == [1, 2] and all(b["run_ms"] > 0 for b in buckets)
        assert result["engine"]["providers_running"] == ["CPUExecutionProvider"]
    assert "fp32: running" in (tmp_path / "preflight.log").read_text()


def test_targets_fail_where_cuda_or_a_graph_is_missing(tmp_path: Path) -> None:
    def result(target: str, load: int, rps: float) -> dict[str, object]:
        return {"target": target, "mode": "closed", "load": load, "throughput_rps": rps,
                "images_per_s": rps, "gpu_busy_pct": 90.0,
                "latency_ms": {"p50": 5.0, "p99": 9.0, "max": 20.0}}

    engine = {"providers_running": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "buckets": [{"size": 1, "cuda_graph": True}, {"size": 2, "cuda_graph": False}]}
    bench = {"service_engine": engine, "results": [
        *(result(t, c, rps) for c in (1, 16, 64)
          for t, rps in (("service", 1000.0), ("peer", 300.0), ("front-end", 1200.0)))]}
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "n-eval-fp16.json").write_text(json.dumps({"difference": {"AP": -0.001}}))
    done = subprocess.run([sys.executable, str(SCRIPTS / "gpu_targets.py"), str(tmp_path), "n"],
                          capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert done.returncode == 1
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL  n buckets with a CUDA graph (1 of 2, all): 1.000"]
    assert any(line.startswith("PASS  c=64 service/peer") for line in lines)
    assert "targets: 1 failed" in lines[-1]
