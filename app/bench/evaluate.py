"""``dfine-serve eval``: COCO AP of the service, through its HTTP API or in-process.

    dfine-serve eval --data data/shapes/val --url http://127.0.0.1:8000
    dfine-serve eval --data data/shapes/val --model models/dfine_n_shapes.onnx --providers cpu
    dfine-serve eval --data val --model m.onnx --providers tensorrt --compare-providers cpu
    dfine-serve eval --data val --model m.onnx --providers cuda --compare-precision fp16
    dfine-serve eval --data val --model m.onnx --set preprocess=fast --compare-set preprocess=exact

Every image is sent with score_threshold=0 and max_detections=300: AP needs all detections.
The COCO evaluator (faster-coco-eval) comes with the `[models]` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from app.bench.cli import ProgressBar
from app.bench.images import content_type
from app.bench.load import Connection, Endpoint
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import ServiceError
from app.metrics import Metrics
from app.service import Detector, DetectParams

ALL = {"score_threshold": 0.0, "max_detections": 300}
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class Target:
    name: str
    url: str | None = None
    model: Path | None = None
    providers: str = "auto"
    overrides: dict[str, str] = field(default_factory=dict)  # settings, in-process only


def load_dataset(data: Path) -> tuple[Path, dict[str, Any]]:
    annotations = data if data.is_file() else data / "annotations.json"
    return annotations, json.loads(annotations.read_text())


def _to_results(image_id: int, detections: list[dict[str, Any]],
                category_of: dict[str, int], sorted_ids: list[int]) -> list[dict[str, Any]]:
    results = []
    for d in detections:
        category = category_of.get(d["label"])
        if category is None and 0 <= d["class_id"] < len(sorted_ids):
            category = sorted_ids[d["class_id"]]
        if category is None:
            continue
        b = d["box"]
        results.append({"image_id": image_id, "category_id": category, "score": d["score"],
                        "bbox": [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]]})
    return results


async def _detect_over_http(url: str, images: list[tuple[int, bytes]], concurrency: int,
                            headers: dict[str, str], bar: ProgressBar
                            ) -> dict[int, list[dict[str, Any]]]:
    endpoint = Endpoint.parse(url)
    path = f"/detect?score_threshold=0&max_detections={ALL['max_detections']}"
    pending = list(reversed(images))
    found: dict[int, list[dict[str, Any]]] = {}

    async def client() -> None:
        connection = Connection(endpoint.host, endpoint.port, headers)
        try:
            while pending:
                image_id, body = pending.pop()
                status, payload = await connection.request("POST", path, body,
                                                           content_type(body))
                if status != 200:
                    raise RuntimeError(f"image {image_id}: HTTP {status} {payload[:200]!r}")
                found[image_id] = orjson.loads(payload)["detections"]
                bar(1)
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return found


async def _detect_in_process(target: Target, images: list[tuple[int, bytes]],
                             concurrency: int, bar: ProgressBar
                             ) -> dict[int, list[dict[str, Any]]]:
    settings = Settings(model_path=target.model, providers=target.providers,
                        **target.overrides)  # type: ignore[arg-type]  # pydantic converts
    engine = await asyncio.to_thread(OnnxEngine.load, settings)
    detector = Detector(engine, settings, Metrics().for_version(engine.info.name, 1))
    await asyncio.to_thread(detector.warm_up)
    detector.start()
    params = DetectParams(score_threshold=0.0, max_detections=300, clip=settings.clip_boxes,
                          dedupe_iou=settings.dedupe_iou)
    pending = list(reversed(images))
    found: dict[int, list[dict[str, Any]]] = {}

    async def client() -> None:
        while pending:
            image_id, body = pending.pop()
            result = await detector.detect(body, params)
            found[image_id] = [
                {"label": d.label, "class_id": d.class_id, "score": d.score,
                 "box": dict(zip(("x1", "y1", "x2", "y2"), d.box))}
                for d in result.detections]
            bar(1)

    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        await detector.stop()
    return found


def coco_metrics(annotations: Path, results: list[dict[str, Any]],
                 image_ids: list[int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (COCO's definitions), over ``image_ids`` if given."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("dfine-serve eval needs faster-coco-eval: "
                         "pip install 'dfine-serve[models]'") from exc
    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluator = COCOeval_faster(truth, truth.loadRes(results), "bbox")
        if image_ids is not None:  # score only the images that ran
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: round(float(v), 4) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}


def evaluate(target: Target, data: Path, concurrency: int = 4, limit: int = 0,
             api_key: str | None = None) -> dict[str, Any]:
    annotations, coco = load_dataset(data)
    entries = coco["images"][:limit] if limit else coco["images"]
    images = [(e["id"], (annotations.parent / e["file_name"]).read_bytes()) for e in entries]
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    category_of = {c["name"]: c["id"] for c in categories}
    sorted_ids = [c["id"] for c in categories]
    bar = ProgressBar(f"eval {target.name}", total=len(images), unit="images")
    started = time.perf_counter()
    if target.url:
        headers = {"X-API-Key": api_key} if api_key else {}
        found = asyncio.run(_detect_over_http(target.url, images, concurrency, headers, bar))
    else:
        assert target.model is not None
        found = asyncio.run(_detect_in_process(target, images, concurrency, bar))
    elapsed = time.perf_counter() - started
    bar.close()
    results = [r for image_id, dets in found.items()
               for r in _to_results(image_id, dets, category_of, sorted_ids)]
    metrics = coco_metrics(annotations, results, [e["id"] for e in entries] if limit else None)
    return {"target": target.name, **metrics, "images": len(images),
            "images_per_s": round(len(images) / elapsed, 2), "data": str(data)}


def _settings(pairs: list[str], precision: str | None) -> dict[str, str]:
    overrides = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    if len(overrides) != len(pairs):
        raise SystemExit("--set and --compare-set take SETTING=VALUE")
    if precision:
        overrides["precision"] = precision
    return overrides


def _in_process(model: Path, providers: str, overrides: dict[str, str]) -> Target:
    """A target named by what tells it apart: model, providers, precision, other settings."""
    name = ":".join([model.name, providers, overrides.get("precision", "fp32"),
                     *(f"{k}={v}" for k, v in sorted(overrides.items()) if k != "precision")])
    return Target(name, model=model, providers=providers, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfine-serve eval", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="COCO split folder or JSON file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running service")
    where.add_argument("--model", type=Path, help="in-process, with this ONNX model")
    p.add_argument("--providers", default="auto", help="in-process providers (as the service)")
    p.add_argument("--compare-url", help="also evaluate this service and print the difference")
    p.add_argument("--compare-model", type=Path, help="also evaluate this model in-process")
    p.add_argument("--compare-providers",
                   help="also evaluate --model (or --compare-model) with these providers")
    p.add_argument("--precision", choices=("fp32", "fp16"),
                   help="in-process precision (as the service's --precision)")
    p.add_argument("--compare-precision", choices=("fp32", "fp16"),
                   help="also evaluate --model (or --compare-model) at this precision")
    p.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                   help="an in-process setting, e.g. preprocess=fast or dedupe_iou=0.7")
    p.add_argument("--compare-set", action="append", default=[], metavar="SETTING=VALUE",
                   help="also evaluate --model (or --compare-model) with these settings")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.add_argument("--api-key")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = _settings(args.set, args.precision)
    first = (Target("service", url=args.url) if args.url
             else _in_process(args.model, args.providers, overrides))
    targets = [first]
    if args.compare_url:
        targets.append(Target("compare-service", url=args.compare_url))
    elif (args.compare_model or args.compare_providers or args.compare_precision
          or args.compare_set):
        model = args.compare_model or args.model
        if model is None:
            raise SystemExit("--compare-providers, --compare-precision and --compare-set need "
                             "--model or --compare-model")
        targets.append(_in_process(model, args.compare_providers or args.providers, {
            **overrides, **_settings(args.compare_set, args.compare_precision)}))
    try:
        rows = [evaluate(t, args.data, args.concurrency, args.limit, args.api_key)
                for t in targets]
    except (ServiceError, OSError, RuntimeError, ValueError) as exc:
        raise SystemExit(f"dfine-serve eval: error: {exc}") from exc
    report: dict[str, Any] = {"results": rows}
    print("| target | " + " | ".join(METRIC_NAMES) + " | images/s |")
    print("|---|" + "---|" * (len(METRIC_NAMES) + 1))
    for row in rows:
        print(f"| {row['target']} | " + " | ".join(f"{row[m]:.4f}" for m in METRIC_NAMES)
              + f" | {row['images_per_s']} |")
    if len(rows) == 2:
        report["difference"] = {m: round(rows[1][m] - rows[0][m], 4) for m in METRIC_NAMES}
        print("difference (second - first): " + json.dumps(report["difference"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
