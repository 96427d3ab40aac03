"""The GPU targets of issues 10 and 17, checked against what gpu-check.sh wrote: one line per
target, and an exit status of 1 when any fails.

    python docs/performance/gpu_targets.py build/gpu-check n|l
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CUDA = "CUDAExecutionProvider"
failures: list[str] = []


def service(report: dict[str, Any], load: float, target: str = "service") -> dict[str, Any]:
    return next(r for r in report["results"]
                if r["target"] == target and r["mode"] == "closed" and r["load"] == load)


def check(name: str, value: float, ok: bool) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3f}")
    if not ok:
        failures.append(name)


def check_engine(name: str, report: dict[str, Any]) -> None:
    """CUDA runs the model, and every bucket replays a CUDA graph."""
    engine = report.get("service_engine") or {}
    running = engine.get("providers_running", [])
    check(f"{name} CUDA running the model ({running})", 1.0 if running[:1] == [CUDA] else 0.0,
          running[:1] == [CUDA])
    buckets = engine.get("buckets", [])
    graphs = sum(1 for b in buckets if b["cuda_graph"])
    check(f"{name} buckets with a CUDA graph ({graphs} of {len(buckets)}, all)", graphs,
          bool(buckets) and graphs == len(buckets))
    print(f"{name} service engine:", json.dumps(engine))


def read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        print(f"FAIL  {path} missing (its step failed or ran out of time: see the part's log)")
        failures.append(str(path))
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def part_n(out: Path) -> None:
    bench = read(out / "n" / "bench.json")
    if bench is not None:
        check_engine("n", bench)
        c64, c16 = service(bench, 64), service(bench, 16)
        peer64 = service(bench, 64, "peer")["throughput_rps"]
        check("c=64 service/peer req/s (>= 3)", c64["throughput_rps"] / peer64,
              c64["throughput_rps"] >= 3 * peer64)
        ratio = c16["latency_ms"]["p99"] / c16["latency_ms"]["p50"]
        check("c=16 p99/p50 (<= 3)", ratio, ratio <= 3)
        worst = max(r["latency_ms"]["max"] for r in bench["results"]
                    if r["target"] == "service")
        check("service max latency ms at any concurrency (< 1000)", worst, worst < 1000)
        for load in (1, 16, 64):  # figures, not targets: how near the front end's own limit
            front = service(bench, load, "front-end")["throughput_rps"]
            own = service(bench, load)["throughput_rps"]
            print(f"info  c={load}: service {own:.1f} req/s, front end alone {front:.1f} "
                  f"req/s ({own / front:.2f} of it)")
    eval_report = read(out / "n-eval-fp16.json")
    if eval_report is not None:
        delta = eval_report["difference"]["AP"]
        check("fp16 - fp32 AP (|d| <= 0.005)", delta, abs(delta) <= 0.005)


def part_l(out: Path) -> None:
    reports = {p: read(out / f"l-{p}" / "bench.json") for p in ("fp32", "fp16")}
    for name, report in reports.items():
        if report is None:
            continue
        check_engine(name, report)
        c64, best = service(report, 64), report["engine_ceiling"]["images_per_s"]
        check(f"{name} c=64 service/engine ceiling images/s (>= 0.9)",
              c64["images_per_s"] / best, c64["images_per_s"] >= 0.9 * best)
        busy = c64["gpu_busy_pct"] or 0.0
        check(f"{name} c=64 GPU busy % (>= 85)", busy, busy >= 85)
        print(f"info  {name} engine ceiling by batch:",
              json.dumps(report["engine_ceiling"]["images_per_s_by_batch"]))
    fp32, fp16 = reports["fp32"], reports["fp16"]
    if fp32 is not None and fp16 is not None:
        speedup = service(fp16, 64)["images_per_s"] / service(fp32, 64)["images_per_s"]
        check("fp16/fp32 images/s at c=64 (>= 1.8)", speedup, speedup >= 1.8)
    if fp16 is not None:
        p50 = service(fp16, 1)["latency_ms"]["p50"]
        check("fp16 c=1 p50 ms (<= 10)", p50, p50 <= 10)


def part_f(out: Path) -> None:
    """FRONTENDS auto against 1: figures to read, no target of their own."""
    print("part f: no targets; the figures are in", out / "f-0", "and", out / "f-1")


def part_s(out: Path) -> None:
    """Video streams: CUDA ran the model; every step's figures, and how many kept up."""
    path = out / "s.json"
    if not path.exists():
        check(f"{path} written", 0.0, False)
        return
    report = json.loads(path.read_text())
    running = (report.get("service_engine") or {}).get("providers_running", [])
    check(f"streams: CUDA running the model ({running})", 1.0 if running[:1] == [CUDA] else 0.0,
          running[:1] == [CUDA])
    for step in report["results"]:
        print(f"streams {step.get('streams')}: " + json.dumps(
            {k: v for k, v in step.items() if k not in ("threads", "per_stream")}))
    print("streams kept up with:", report.get("largest_keeping_up"))


if __name__ == "__main__":
    {"n": part_n, "l": part_l, "f": part_f, "s": part_s}[sys.argv[2]](Path(sys.argv[1]))
    print(f"targets: {len(failures)} failed" if failures else "targets: all passed")
    sys.exit(1 if failures else 0)
