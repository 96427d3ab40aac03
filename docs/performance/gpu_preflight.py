"""The GPU check's first 30 seconds: does the engine run as planned before minutes are spent
measuring it? For the shipped model in fp32 and fp16: the providers asked and running, and per
bucket whether its runs replay a CUDA graph (captured on the runner's thread and checked at
warm-up against a plain run on random input), its run time and memory.

    python docs/performance/gpu_preflight.py OUT_DIR [--providers cuda] [--service-args ...]

Writes OUT_DIR/preflight.json; exits 1 when CUDA is not running the model or a bucket has no
graph (with --providers cpu, as tried on a CPU machine, only that the engine loads and runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.config import DEFAULT_MODEL_PATH, settings_from_args
from app.engine.engine import OnnxEngine

CUDA = "CUDAExecutionProvider"


def check(model: Path, providers: str, precision: str, extra: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    settings = settings_from_args(["--model-path", str(model), "--providers", providers,
                                   "--precision", precision, *extra])
    engine = OnnxEngine.load(settings)
    loaded = time.perf_counter()
    engine.warm_up()
    warmed = time.perf_counter()
    w, h = engine.info.input_width, engine.info.input_height
    n = min(3, engine.parallel.max_batch_size)  # a padded batch where buckets allow
    images = np.random.default_rng(0).random((n, 3, h, w), dtype=np.float32)
    out = engine.run(images, np.asarray([[w, h]] * n, np.int64))
    return {"precision": precision, "load_s": round(loaded - started, 2),
            "warm_up_s": round(warmed - loaded, 2), "engine": engine.report(),
            "runs": bool(np.isfinite(out.scores).all())}


def problems(result: dict[str, Any], providers: str) -> list[str]:
    engine = result["engine"]
    found = [] if result["runs"] else ["scores are not finite"]
    if providers != "cpu":
        if engine["providers_running"][:1] != [CUDA]:
            found.append(f"CUDA is not running the model: {engine['providers_running']}")
        found += [f"bucket {b['size']} has no CUDA graph" for b in engine["buckets"]
                  if not b["cuda_graph"]]
        if not engine["buckets"]:
            found.append("no buckets")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--providers", default="cuda")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--service-args", default="", help="more service flags")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for precision in ("fp32", "fp16"):
        result = check(args.model, args.providers, precision, shlex.split(args.service_args))
        result["problems"] = problems(result, args.providers)
        results.append(result)
        failed += [f"{precision}: {p}" for p in result["problems"]]
        engine = result["engine"]
        print(f"{precision}: running {engine['providers_running']} (asked "
              f"{engine['providers_asked']}), load {result['load_s']} s, warm-up "
              f"{result['warm_up_s']} s")
        for b in engine["buckets"]:
            print(f"  bucket {b['size']}: graph {b['cuda_graph']}, {b['run_ms']} ms a run, "
                  f"{b['memory_mb']} MB")
    (args.out / "preflight.json").write_text(json.dumps(results, indent=2) + "\n")
    print("files:", " ".join(sorted(str(p.relative_to(args.out))
                                     for p in args.out.rglob("*") if p.is_file())))
    for line in failed:
        print("FAIL ", line)
    print("preflight:", "FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
