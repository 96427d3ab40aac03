"""``dfine-serve bench-tiling``: what tiling costs, through a running service.

    dfine-serve bench-tiling --url http://127.0.0.1:8000 --images data/small/val/images \\
        --variant tile=none --variant tile=auto --variant tile=640 --concurrency 1,4

Each variant is a /detect query (``tile=none``, ``tile=auto``, ``tile=640&tile_full_image=
false``...). Variants are measured in turns, round by round (a noisy machine drifts all of them
alike), each turn a closed loop of ``concurrency`` clients over the images for ``duration``
seconds. Per variant and concurrency: images/s, latency p50 and p95, and per image the tiles,
engine images and engine runs its answers report (``tiling``), medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from app.bench.images import content_type
from app.bench.load import Connection, Endpoint


async def _turn(url: str, query: str, images: list[bytes], concurrency: int,
                duration_s: float, headers: dict[str, str]) -> dict[str, Any]:
    endpoint = Endpoint.parse(url)
    path = f"/detect?{query}"
    latencies: list[float] = []
    tiles: list[int] = []
    engine_images: list[int] = []
    runs: list[int] = []
    next_image = iter(range(1 << 30))
    stop_at = time.perf_counter() + duration_s

    async def client() -> None:
        connection = Connection(endpoint.host, endpoint.port, headers)
        try:
            while time.perf_counter() < stop_at:
                body = images[next(next_image) % len(images)]
                started = time.perf_counter()
                status, payload = await connection.request("POST", path, body,
                                                           content_type(body))
                if status != 200:
                    raise RuntimeError(f"{path}: HTTP {status} {payload[:200]!r}")
                latencies.append(time.perf_counter() - started)
                tiling = orjson.loads(payload).get("tiling")
                tiles.append(len(tiling["tiles"]) if tiling else 0)
                engine_images.append(tiling["engine_images"] if tiling else 1)
                runs.append(tiling["engine_runs"] if tiling else 1)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"images_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * ordered[len(ordered) // 2],
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "tiles": statistics.fmean(tiles), "engine_images": statistics.fmean(engine_images),
            "engine_runs": statistics.fmean(runs), "requests": len(latencies)}


def measure(url: str, images: list[bytes], variants: list[str], concurrencies: list[int],
            duration_s: float, rounds: int, headers: dict[str, str]) -> list[dict[str, Any]]:
    turns: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        for concurrency in concurrencies:
            for query in variants:
                result = asyncio.run(_turn(url, query, images, concurrency, duration_s, headers))
                turns.setdefault((query, concurrency), []).append(result)
                print(f"round {round_ + 1}/{rounds} c={concurrency} {query}: "
                      f"{result['images_per_s']:.2f} images/s, p50 {result['p50_ms']:.0f} ms",
                      flush=True)
    rows = []
    for (query, concurrency), results in turns.items():
        row: dict[str, Any] = {"variant": query, "concurrency": concurrency}
        for key in results[0]:
            row[key] = round(statistics.median(r[key] for r in results), 2)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | clients | images/s | p50 ms | p95 ms | tiles | engine images | "
             "engine runs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['concurrency']} | {r['images_per_s']} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['tiles']} | "
                     f"{r['engine_images']} | {r['engine_runs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dfine-serve bench-tiling",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True, help="a running service")
    parser.add_argument("--images", type=Path, required=True, help="a folder of images")
    parser.add_argument("--limit", type=int, default=16, help="images used, at most")
    parser.add_argument("--variant", action="append", default=[],
                        help="a /detect query, e.g. tile=640 (repeatable; default: none, auto)")
    parser.add_argument("--concurrency", default="1,4", help="comma list of client counts")
    parser.add_argument("--duration-s", type=float, default=10.0, help="per turn")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.images.iterdir() if p.is_file())[:args.limit]
    if not files:
        raise SystemExit(f"no images in {args.images}")
    images = [p.read_bytes() for p in files]
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    rows = measure(args.url, images, args.variant or ["tile=none", "tile=auto"],
                   [int(c) for c in args.concurrency.split(",")], args.duration_s,
                   args.rounds, headers)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
