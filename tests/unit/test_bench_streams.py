"""``dfine-serve bench-streams``' pure parts: Prometheus' histogram_quantile over bucket deltas
(on real prometheus_client expositions), one window's figures from two /metrics texts, the
keeps-up rule, the tables; and its cameras, a real MJPEG server read over a socket."""

from __future__ import annotations

import math
import socket

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.bench.streams import (
    LAG_HISTOGRAM,
    StepResult,
    bucket_deltas,
    cameras,
    histogram_buckets,
    histogram_quantile,
    keeps_up,
    largest_keeping_up,
    main,
    moving_shapes,
    pooled,
    summarize,
    table,
    thread_group,
    threads_table,
)
from app.bench.wrk import EXITED_THREADS, ThreadGroup, ThreadUse
from app.metrics import LAG_BUCKETS_S

INF = math.inf


def test_quantile_interpolates_within_the_bucket_the_rank_falls_in() -> None:
    buckets = {0.1: 10.0, 0.2: 20.0, INF: 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)  # rank 10: the first's top
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)  # halfway into the second
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # the first starts at 0
    assert histogram_quantile(0.0, buckets) == 0.0
    assert histogram_quantile(0.0, {0.1: 0.0, 0.2: 4.0, INF: 4.0}) == 0.0


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, {0.1: 10.0, 0.2: 20.0, INF: 30.0}) == 0.2


def test_quantile_without_observations_or_an_inf_bucket_is_none() -> None:
    assert histogram_quantile(0.5, {0.1: 0.0, INF: 0.0}) is None
    assert histogram_quantile(0.5, {0.1: 3.0, 0.2: 5.0}) is None  # no +Inf
    assert histogram_quantile(0.5, {INF: 5.0}) is None  # one bucket
    assert histogram_quantile(1.5, {0.1: 3.0, INF: 3.0}) is None


def test_quantile_takes_a_falling_count_as_the_one_before_it() -> None:
    # A scrape between two bucket updates can show a lower count above a higher one.
    assert histogram_quantile(0.5, {0.1: 10.0, 0.2: 8.0, INF: 20.0}) == pytest.approx(0.1)


def _exposition(lags: list[float], registry: CollectorRegistry | None = None,
                histogram: Histogram | None = None) -> tuple[str, CollectorRegistry, Histogram]:
    registry = registry or CollectorRegistry()
    histogram = histogram or Histogram(LAG_HISTOGRAM, "lag", buckets=LAG_BUCKETS_S,
                                       registry=registry)
    for lag in lags:
        histogram.observe(lag)
    return generate_latest(registry).decode(), registry, histogram


def test_buckets_from_a_real_exposition_and_their_deltas() -> None:
    before, registry, histogram = _exposition([0.005, 0.04, 7.0])
    after, _, _ = _exposition([0.15] * 99 + [0.6], registry, histogram)
    first = histogram_buckets(before, LAG_HISTOGRAM)
    assert set(first) == {*LAG_BUCKETS_S, INF}
    assert first[0.01] == 1 and first[0.05] == 2 and first[10.0] == 3 and first[INF] == 3
    window = bucket_deltas(first, histogram_buckets(after, LAG_HISTOGRAM))
    assert window[0.1] == 0 and window[0.2] == 99 and window[INF] == 100
    # What Prometheus would say of the window: 0.1 + 0.1 * 50/99, and the top of 0.5-0.75.
    assert histogram_quantile(0.5, window) == pytest.approx(0.1 + 0.1 * 50 / 99)
    assert histogram_quantile(1.0, window) == pytest.approx(0.75)


def _stream_metrics(processed: dict[str, float], received: dict[str, float],
                    dropped: dict[str, float], lag: dict[str, float], lags: list[float]) -> str:
    registry = CollectorRegistry()
    p = Counter("dfine_stream_frames_processed", "", ["stream"], registry=registry)
    r = Counter("dfine_stream_frames_received", "", ["stream"], registry=registry)
    d = Counter("dfine_stream_frames_dropped", "", ["stream", "reason"], registry=registry)
    g = Gauge("dfine_stream_lag_seconds", "", ["stream"], registry=registry)
    h = Histogram(LAG_HISTOGRAM, "", buckets=LAG_BUCKETS_S, registry=registry)
    for stream in processed:
        p.labels(stream).inc(processed[stream])
        r.labels(stream).inc(received[stream])
        d.labels(stream, "behind").inc(dropped[stream])
        d.labels(stream, "failed").inc(0)
        g.labels(stream).set(lag[stream])
    for value in lags:
        h.observe(value)
    return generate_latest(registry).decode()


def test_a_window_s_figures_from_two_scrapes() -> None:
    before = _stream_metrics({"a": 5, "b": 5, "other": 1}, {"a": 5, "b": 6, "other": 1},
                             {"a": 0, "b": 1, "other": 0}, {"a": 0.1, "b": 0.1, "other": 9},
                             [0.05] * 10)
    after = _stream_metrics({"a": 105, "b": 85, "other": 500}, {"a": 106, "b": 106, "other": 1},
                            {"a": 0, "b": 20, "other": 0}, {"a": 0.12, "b": 0.4, "other": 9},
                            [0.05] * 10 + [0.15] * 180)
    uses = [ThreadUse("service 1", 1, "python", "main", 0.5),
            ThreadUse("service 1", 2, "engine-0", "engine-*", 8.5)]
    result = summarize(2, ["a", "b"], before, after, uses, 10.0, 10.0, ["running", "running"])
    assert result.fps_out == [10.0, 8.0] and result.fps_in == [10.1, 10.0]
    assert result.frames_processed == 180 and result.frames_dropped == 19
    assert result.dropped_pct == pytest.approx(100 * 19 / 201, abs=0.05)
    assert result.lag_p50_s == pytest.approx(0.15) and result.lag_p99_s == pytest.approx(0.199)
    assert result.lag_max_gauge_s == 0.4  # the other stream's gauge is not one of ours
    assert result.cpu_ms_per_frame == pytest.approx(50.0)
    assert not result.keeps_up  # b: 8.0 < 0.9 x 10
    assert [(g.role, g.cpu_ms_per_request) for g in result.threads] == [("engine-*", 47.222),
                                                                        ("main", 2.778)]


def test_keeps_up_when_every_stream_makes_nine_tenths_of_the_source() -> None:
    assert keeps_up([9.0, 10.2], 10.0)
    assert not keeps_up([9.0, 8.99], 10.0)
    assert not keeps_up([], 10.0)


def test_thread_groups_pool_readers_and_unnamed_threads() -> None:
    assert thread_group("stream-1a2b3c4*") == thread_group("stream-9f8e7d6c")
    assert thread_group("tid 12") == thread_group("tid 13") != "tid 12"
    assert thread_group("decode_*") == "decode_*"
    uses = [ThreadUse("service 1", 0, "", EXITED_THREADS, 0.1),
            ThreadUse("service 1", 5, "stream-1234abcd", "stream-1234abcd", 0.1)]
    assert [u.role for u in pooled(uses)] == [EXITED_THREADS, "stream-* (readers)"]


def _step(streams: int, fps_out: list[float], ok: bool, lag: float | None = 0.1234) -> StepResult:
    return StepResult(streams, 20.0, fps_out, [10.0] * streams, 100, 3, 1.5, lag, 0.3, 0.2,
                      61.25, 1.4, ok, ["running"] * streams,
                      [ThreadGroup("service 7", "engine-*", 2, 40.0, 65.3),
                       ThreadGroup("service 7", "main", 1, 0.1, 0.2)], 0.5, 3.25)


def test_tables_and_the_largest_n_that_keeps_up() -> None:
    results = [_step(1, [10.0], True), _step(2, [9.5, 9.1], True),
               _step(3, [7.0, 8.0, 9.0], False, lag=None)]
    lines = table(results).splitlines()
    assert lines[0].startswith("| streams | fps out min | fps out mean |")
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2] == ("| 1 | 10.0 | 10.0 | 10.0 | 10.0 | 1.5 | 123 | 300 | 200 | 61.2 | 1.4 "
                        "| yes | 3.2 |")
    assert lines[3].startswith("| 2 | 9.1 | 9.3 | 18.6 |") and lines[3].endswith("| yes | 3.2 |")
    assert lines[4].startswith("| 3 | 7.0 | 8.0 | 24.0 | 10.0 | 1.5 | - |")
    assert lines[4].endswith("| no | 3.2 |")
    assert largest_keeping_up(results) == 2
    assert largest_keeping_up(results[2:]) is None
    threads = threads_table(results[:1]).splitlines()
    assert threads[2] == "| 1 | service | engine-* | 2 | 40.0 | 65.3 |"
    assert len(threads) == 3  # main's 0.2 % left out


def test_bad_stream_counts_are_refused() -> None:
    for bad in ("", "0,1", "two"):
        with pytest.raises(SystemExit, match="--streams"):
            main(["--streams", bad])


def _read_part(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bytes]:
    """One multipart part: its headers and its body (by its Content-Length)."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end])
    del buffer[:end + 4]
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(buffer) < length + 2:
        buffer += sock.recv(65536)
    body = bytes(buffer[:length])
    del buffer[:length + 2]
    return head, body


def test_cameras_serve_live_mjpeg_of_the_frames() -> None:
    frames = moving_shapes(4, 320, 240)
    assert len(set(frames)) == 4  # the shapes move
    with cameras(2, 50.0, frames) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /cam/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            buffer = bytearray()
            while b"\r\n\r\n" not in buffer:
                buffer += sock.recv(65536)
            end = buffer.index(b"\r\n\r\n")
            response = bytes(buffer[:end]).decode()
            del buffer[:end + 4]
            assert response.startswith("HTTP/1.0 200")
            assert "multipart/x-mixed-replace; boundary=frame" in response
            parts = [_read_part(sock, buffer) for _ in range(5)]
        for head, body in parts:
            assert head.startswith(b"--frame\r\n") and b"Content-Type: image/jpeg" in head
            image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None and image.shape == (240, 320, 3)
        assert [body for _, body in parts[:4]] != [parts[0][1]] * 4  # a loop, not one frame
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /cam/2 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.0 404")
