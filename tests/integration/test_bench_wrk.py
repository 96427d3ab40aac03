"""``dfine-serve bench --wrk`` for real, briefly: wrk against the service with its instant
engine, the service's CPU read from /proc per thread, and two configurations compared."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from app.cli import main

pytestmark = pytest.mark.skipif(
    shutil.which("wrk") is None and not os.access("/usr/bin/wrk", os.X_OK),
    reason="wrk is not installed: `make tools` installs it (apt-get install wrk)")


def test_wrk_mode_measures_the_front_end_per_thread(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(["bench", "--wrk", "--front-end", "--wrk-requests", "tiny", "--concurrency", "8",
          "--duration-s", "2", "--wrk-warmup-s", "1", "--repeat", "1", "--out", str(out)])
    report = json.loads((out / "wrk.json").read_text())
    assert report["mode"] == "wrk" and report["targets"]["front-end"]["engine"]["instant"]
    [result] = report["results"]
    assert (result["target"], result["request"], result["concurrency"]) == ("front-end",
                                                                             "tiny", 8)
    assert result["ok"] > 0 and result["throughput_rps"] > 0
    assert result["non_2xx"] == 0 and not result["socket_errors"]
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    # The service's CPU: something per request, far less than a second of it.
    assert 0 < result["cpu_ms_per_request"] < 1000
    roles = {(g["process"].split()[0], g["role"]) for g in result["threads"]}
    assert ("service", "main") in roles  # the event loop's thread, by its tid == pid
    busiest, lone = result["busiest_thread"], result["busiest_lone_thread"]
    assert 0 < lone["cpu_ms_per_request"] <= busiest["cpu_ms_per_request"]
    assert busiest["cpu_ms_per_request"] <= result["cpu_ms_per_request"]
    here, sixteen = result["ceiling_rps"].values()
    assert 0 < here <= sixteen
    assert result["avg_batch_size"] >= 1
    assert (out / "wrk-0-front-end.log").stat().st_size > 0


def test_wrk_mode_compares_configurations_with_multipart_uploads(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(["bench", "--wrk", "--front-end", "--wrk-requests", "multipart",
          "--concurrency", "4", "--duration-s", "1", "--wrk-warmup-s", "0",
          "--compare", "DECODE_WORKERS=1", "--compare", "DECODE_WORKERS=2",
          "--out", str(out)])
    report = json.loads((out / "wrk.json").read_text())
    # Each configuration reached its service through the environment.
    workers = {name: t["engine"]["decode_workers"] for name, t in report["targets"].items()}
    assert workers == {"DECODE_WORKERS=1": 1, "DECODE_WORKERS=2": 2}
    assert report["targets"]["DECODE_WORKERS=1"]["env"] == {"DFINE_DECODE_WORKERS": "1"}
    results = {r["target"]: r for r in report["results"]}
    assert set(results) == set(workers)
    for result in results.values():
        # A malformed multipart body would be refused: every upload was read as an image.
        assert result["request"] == "multipart" and result["ok"] > 0
        assert result["non_2xx"] == 0 and result["cpu_ms_per_request"] > 0


def test_wrk_mode_needs_the_pid_of_a_running_service(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--pid"):
        main(["bench", "--wrk", "--url", "http://127.0.0.1:9", "--out", str(tmp_path)])
