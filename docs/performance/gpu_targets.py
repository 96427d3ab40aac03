"""Issue 10's GPU targets, checked against what gpu-check.sh wrote: one line per target.

    python docs/performance/gpu_targets.py build/gpu-check n|l
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def service(report: dict[str, Any], load: float) -> dict[str, Any]:
    return next(r for r in report["results"]
                if r["target"] == "service" and r["mode"] == "closed" and r["load"] == load)


def peer(report: dict[str, Any], load: float) -> dict[str, Any]:
    return next(r for r in report["results"] if r["target"] == "peer" and r["load"] == load)


def check(name: str, value: float, ok: bool) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3f}")


def part_n(out: Path) -> None:
    bench = json.loads((out / "n" / "bench.json").read_text())
    c64, c16 = service(bench, 64), service(bench, 16)
    check("c=64 service/peer req/s (>= 3)", c64["throughput_rps"]
          / peer(bench, 64)["throughput_rps"], c64["throughput_rps"]
          >= 3 * peer(bench, 64)["throughput_rps"])
    check("c=64 service req/s (>= 1500)", c64["throughput_rps"], c64["throughput_rps"] >= 1500)
    ratio = c16["latency_ms"]["p99"] / c16["latency_ms"]["p50"]
    check("c=16 p99/p50 (<= 3)", ratio, ratio <= 3)
    worst = max(r["latency_ms"]["max"] for r in bench["results"] if r["target"] == "service")
    check("service max latency ms at any concurrency (< 1000)", worst, worst < 1000)
    eval_report = json.loads((out / "n-eval-fp16.json").read_text())
    delta = eval_report["difference"]["AP"]
    check("fp16 - fp32 AP (|d| <= 0.005)", delta, abs(delta) <= 0.005)
    print("service engine:", json.dumps(bench["service_engine"]))


def part_l(out: Path) -> None:
    fp32 = json.loads((out / "l-fp32" / "bench.json").read_text())
    fp16 = json.loads((out / "l-fp16" / "bench.json").read_text())
    for name, report in (("fp32", fp32), ("fp16", fp16)):
        c64, best = service(report, 64), report["engine_ceiling"]["images_per_s"]
        check(f"{name} c=64 service/engine ceiling images/s (>= 0.9)",
              c64["images_per_s"] / best, c64["images_per_s"] >= 0.9 * best)
        busy = c64["gpu_busy_pct"] or 0.0
        check(f"{name} c=64 GPU busy % (>= 85)", busy, busy >= 85)
        print(f"{name} service engine:", json.dumps(report["service_engine"]))
    speedup = service(fp16, 64)["images_per_s"] / service(fp32, 64)["images_per_s"]
    check("fp16/fp32 images/s at c=64 (>= 1.8)", speedup, speedup >= 1.8)
    p50 = service(fp16, 1)["latency_ms"]["p50"]
    check("fp16 c=1 p50 ms (<= 10)", p50, p50 <= 10)


if __name__ == "__main__":
    {"n": part_n, "l": part_l}[sys.argv[2]](Path(sys.argv[1]))
