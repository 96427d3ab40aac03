"""The bench's load generator against a tiny asyncio HTTP server (keep-alive and close), and
how it sums up repeated runs."""

from __future__ import annotations

import asyncio

from app.bench.cli import median_run, throughput_ratios
from app.bench.load import closed_loop, open_loop
from app.bench.stats import RunResult, Sample, summarize


async def serve(close_every: int = 0) -> tuple[asyncio.Server, int, list[int]]:
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            seen.append(length)
            close = close_every and len(seen) % close_every == 0
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         + (b"Connection: close\r\n" if close else b"") + b"\r\n{}")
            await writer.drain()
            if close:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_closed_loop_keeps_concurrency_and_survives_closed_connections() -> None:
    server, port, seen = await serve(close_every=3)
    samples, elapsed = await closed_loop(f"http://127.0.0.1:{port}/detect", [b"abc"], 4, 0.3)
    server.close()
    assert samples and all(s.status == 200 for s in samples)
    # It stops at its duration (0.3 s), give or take a loaded machine's delays.
    assert len(seen) == len(samples) and 0.3 <= elapsed < 2.0


async def test_open_loop_sends_about_rate_times_duration() -> None:
    server, port, _ = await serve()
    samples, _ = await open_loop(f"http://127.0.0.1:{port}/detect", [b"x"], 200, 1.0)
    server.close()
    assert 140 <= len(samples) <= 260  # Poisson: 200 +- 4 sigma


def test_summary_percentiles_and_errors() -> None:
    samples = [Sample(200, 0.01 * (i + 1)) for i in range(100)] + [Sample(503, 0.001)] * 5
    result = summarize("service", "closed", 8, samples, 2.0)
    assert result.ok == 100 and result.throughput_rps == 50
    assert result.latency_ms["p50"] == 505.0 and result.latency_ms["max"] == 1000.0
    assert result.errors == {"503": 5} and result.error_latency_ms_p99 == 1.0
    assert result.cpu_ms_per_request is None  # no server CPU given
    assert summarize("ceiling", "closed", 8, samples, 2.0, cpu_s=2.5).cpu_ms_per_request == 25.0


def test_median_run_picks_the_middle_throughput_and_keeps_the_others() -> None:
    runs = [summarize("service", "closed", 8, [Sample(200, 0.01)] * n, 1.0) for n in (70, 50, 60)]
    chosen = median_run(runs)
    assert chosen.throughput_rps == 60
    assert chosen.extra["repeats_rps"] == [70, 50, 60]
    assert median_run(runs[:1]).extra == {}


def test_overload_is_compared_with_the_best_ceiling_of_the_run() -> None:
    def run(target: str, load: float, rps: int) -> RunResult:
        return summarize(target, "closed", load, [Sample(200, 0.01)] * rps, 1.0)

    ratios = throughput_ratios([run("service", 8, 69), run("ceiling", 8, 72),
                                run("ceiling", 32, 75), run("service-overload", 64, 60)])
    assert ratios["c=8"] == {"service/ceiling": round(69 / 72, 3)}
    assert ratios["overload c=64"] == {"service/best ceiling": 0.8}


def test_http_time_is_latency_minus_the_services_own_time() -> None:
    samples = [Sample(200, 0.020 + i / 10000, server_s=0.019) for i in range(100)]
    samples += [Sample(200, 0.5), Sample(503, 0.1, server_s=None)]  # not read: left out
    result = summarize("service", "closed", 1, samples, 1.0)
    assert result.http_ms is not None and 5.9 < result.http_ms["p50"] < 6.0
    assert summarize("peer", "closed", 1, [Sample(200, 0.02)], 1.0).http_ms is None
