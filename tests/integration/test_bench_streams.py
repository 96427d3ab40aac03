"""``dfine-serve bench-streams`` end to end, briefly: its cameras, the service it starts (the
shipped model), streams of 1 and 2 cameras measured and deleted, the report it writes."""

from __future__ import annotations

import json
from pathlib import Path

from app.cli import main


def test_bench_streams_measures_each_count_of_streams(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "streams.json"
    main(["bench-streams", "--streams", "1,2", "--seconds", "3", "--warmup-s", "1",
          "--fps", "5", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["service_env"]["DFINE_STREAM_SOURCES"] == "127.0.0.1/32"
    assert int(report["service_env"]["DFINE_MAX_STREAMS"]) >= 2
    assert report["service_engine"]["instant"] is False  # the shipped model ran
    assert report["source"] == {"fps": 5.0, "width": 640, "height": 480,
                                "jpeg_bytes_mean": report["source"]["jpeg_bytes_mean"]}
    results = report["results"]
    assert [r["streams"] for r in results] == [1, 2]
    for r in results:
        n = r["streams"]
        assert 2.5 < r["window_s"] < 30
        assert len(r["fps_out"]) == len(r["fps_in"]) == n
        assert all(f > 0 for f in r["fps_out"]) and all(f > 0 for f in r["fps_in"])
        assert r["states"] == ["running"] * n
        assert r["frames_processed"] > 0 and 0 <= r["dropped_pct"] <= 100
        assert 0 < r["lag_p50_s"] <= r["lag_p99_s"] <= 30
        assert r["lag_max_gauge_s"] > 0
        assert 0 < r["cpu_ms_per_frame"] < 10_000
        assert r["avg_batch_size"] >= 1
        assert 0 <= r["bench_cpu_s"] < 2 * r["window_s"]  # the cameras' own, on 2 cores
        assert r["keeps_up"] == all(f >= 0.9 * 5 for f in r["fps_out"])
        roles = {g["role"] for g in r["threads"]}
        assert {"main", "engine-*"} <= roles
        assert sum(g["share_pct"] for g in r["threads"]) > 99
    kept = [r["streams"] for r in results if r["keeps_up"]]
    assert report["largest_keeping_up"] == (max(kept) if kept else None)
    assert (out.parent / "streams-service.log").stat().st_size > 0
