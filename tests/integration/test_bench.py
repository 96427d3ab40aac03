"""`dfine-serve bench` end to end, briefly: it starts the service and the peer, measures, and
writes its JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from app.cli import main


def test_bench_writes_results_with_ratios_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(["bench", "--concurrency", "1,4", "--duration-s", "1", "--count", "4", "--repeat", "2",
          "--ceiling-instances", "1", "--rate", "10", "--overload", "8", "--overload-queue", "1",
          "--out", str(out)])
    report = json.loads((out / "bench.json").read_text())
    results = report["results"]
    targets = {(r["target"], r["mode"], r["load"]) for r in results}
    for target in ("service", "peer", "ceiling"):
        assert {(target, "closed", 1), (target, "closed", 4)} <= targets
    assert ("service", "open", 10) in targets
    for r in results:
        assert r["throughput_rps"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    service = next(r for r in results if r["target"] == "service" and r["load"] == 4)
    assert service["avg_batch_size"] >= 1 and service["rss_mb"] > 50
    overload = next(r for r in results if r["target"] == "service-overload")
    assert set(overload["errors"]) <= {"503"}
    assert set(report["ratios"]["c=4"]) == {"service/ceiling", "service/peer",
                                            "service/engine ceiling"}
    engine = report["engine_ceiling"]  # the CPU default runs batches of 1 only
    assert set(engine["images_per_s_by_batch"]) == {"1"} and engine["best_batch"] == 1
    assert engine["images_per_s"] > 0
    assert report["service_engine"]["precision"] == "fp32"  # read from the service's /model
    assert all(r["gpu_busy_pct"] is None and r["gpu_memory_mb"] is None for r in results)
    assert set(report["ratios"]["overload c=8"]) == {"service/best ceiling"}
    assert len(service["extra"]["repeats_rps"]) == 2
    # At c=1 the service's own timing is read back: HTTP adds a little, never a negative time.
    lone = next(r for r in results if r["target"] == "service" and r["load"] == 1)
    assert 0 < lone["http_ms"]["p50"] <= lone["http_ms"]["p99"] < lone["latency_ms"]["p99"]
    assert service["http_ms"] is None
    # CPU per request: the service and peer from /proc, the ceiling from its own process; a
    # D-FINE-N run alone costs several ms of CPU, and no answer costs a second.
    for r in results:
        if r["mode"] == "closed":
            assert 3 < r["cpu_ms_per_request"] < 1000, r
    assert report["single_inprocess_call_ms"] > 0 and report["idle_rss_mb"] > 50
    plot = cv2.imread(str(out / "bench.png"))
    assert plot is not None and plot.shape[1] > 500


def test_bench_logs_each_server_and_measures_the_front_end_alone(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(["bench", "--concurrency", "4", "--duration-s", "1", "--count", "2", "--no-peer",
          "--no-ceiling", "--no-engine-ceiling", "--no-single-call", "--front-end",
          "--out", str(out)])
    report = json.loads((out / "bench.json").read_text())
    service, front = (next(r for r in report["results"] if r["target"] == target)
                      for target in ("service", "front-end"))
    # Without the model, the front end answers several times faster than the whole service.
    assert front["throughput_rps"] > 2 * service["throughput_rps"]
    assert report["single_inprocess_call_ms"] is None
    assert set(report["ratios"]["c=4"]) == {"service/front-end"}
    # Each server's log is kept beside the results, not piped away unread.
    assert "loaded" in (out / "service.log").read_text()
    front_log = (out / "front-end.log").read_text()
    assert "warmed up" in front_log and "loaded" not in front_log


def test_bench_measures_each_protocol_on_the_same_service(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(["bench", "--protocol", "detect,v2-http,grpc", "--concurrency", "2",
          "--duration-s", "1", "--count", "2", "--no-peer", "--no-ceiling",
          "--no-engine-ceiling", "--no-single-call", "--out", str(out)])
    report = json.loads((out / "bench.json").read_text())
    by_target = {r["target"]: r for r in report["results"]}
    assert set(by_target) == {"service", "service-v2-http", "service-grpc"}
    for result in by_target.values():
        assert result["requests"] > 0 and not result["errors"], result
        assert result["cpu_ms_per_request"] > 0  # the same server process for each
    assert set(report["ratios"]["c=2"]) == {"service-v2-http/service", "service-grpc/service"}
