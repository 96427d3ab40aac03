"""``dfine-serve eval``: COCO AP of the service, through its HTTP API or in-process.

    dfine-serve eval --data data/shapes/val --url http://127.0.0.1:8000
    dfine-serve eval --data data/shapes/val --model models/dfine_n_shapes.onnx --providers cpu
    dfine-serve eval --data val --model m.onnx --providers tensorrt --compare-providers cpu
    dfine-serve eval --data val --model m.onnx --providers cuda --compare-precision fp16
    dfine-serve eval --data val --model m.onnx --set preprocess=fast --compare-set preprocess=exact
    dfine-serve eval --data small/val --url http://127.0.0.1:8000 --tile 640 --compare-tile none
    dfine-serve eval --data data/small/val --model m.onnx --set max_tiles=64 --tile 320

Every image is sent with score_threshold=0 and max_detections=300: AP needs all detections
(``--score-threshold`` sends another: tiled merging only sees the detections above it).
``--tile`` (auto, none, or pixels) and the ``--tile-*`` options ask for tiled inference (the
service's ``tile*`` query parameters, or ``DetectParams.tiling`` in-process), for every target;
``--compare-tile`` evaluates the first target again with another tile (the other options the
same). Without ``--tile`` a service tiles as its TILE setting says, in-process as ``--set
tile=...`` does. A result records the tiling asked for and, from the answers' "tiling" reports,
the mean tiles, engine images and engine runs per image.
The COCO evaluator (faster-coco-eval) comes with the `[models]` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import orjson

from app.bench.cli import ProgressBar
from app.bench.images import content_type
from app.bench.load import Connection, Endpoint
from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import Overloaded, ServiceError
from app.metrics import Metrics
from app.service import Detector, DetectParams
from app.tiling import (
    DEFAULT_MERGE,
    DEFAULT_MERGE_METRIC,
    DEFAULT_MERGE_THRESHOLD,
    DEFAULT_OVERLAP,
    MATCH_METRICS,
    MERGE_METHODS,
    Tiling,
    parse_tile,
)

ALL = {"score_threshold": 0.0, "max_detections": 300}
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# A tiled image holds an admission place per engine image, and a detector at capacity refuses
# the extra ones at once (503 overloaded) instead of queueing them: such an image is sent again
# after a short pause, as a client should, for up to this long.
OVERLOADED_RETRY_S = 120.0


# What a target is asked to tile: a Tiling, "none" (untiled, whatever the defaults say), or
# None (nothing asked: the service's TILE setting, or in-process the --set tile setting).
TileRequest = Tiling | Literal["none"] | None


@dataclass
class Target:
    name: str
    url: str | None = None
    model: Path | None = None
    providers: str = "auto"
    overrides: dict[str, str] = field(default_factory=dict)  # settings, in-process only
    tiling: TileRequest = None
    score_threshold: float = 0.0


def tile_query(tiling: TileRequest) -> dict[str, str]:
    """The ``tile*`` query parameters of a request, every option spelled out: the service's own
    defaults (TILE_OVERLAP...) must not change what a result says it measured."""
    if tiling is None:
        return {}
    if tiling == "none":
        return {"tile": "none"}
    return {"tile": str(tiling.tile), "tile_overlap": repr(tiling.overlap),
            "tile_merge": tiling.merge, "tile_merge_threshold": repr(tiling.merge_threshold),
            "tile_merge_metric": tiling.merge_metric,
            "tile_full_image": str(tiling.full_image).lower(),
            "tile_class_aware": str(tiling.class_aware).lower()}


def tile_label(tiling: TileRequest) -> str:
    """A target name's tiling part: "" (nothing asked), "tile=none", "tile=640",
    "tile=640,no-full-image"... (only the options off their defaults beside the size)."""
    if tiling is None:
        return ""
    if tiling == "none":
        return "tile=none"
    default = Tiling(tiling.tile)
    parts = [f"tile={tiling.tile}"]
    parts += [f"{k}={v}" for k, v in asdict(tiling).items()
              if k not in ("tile", "full_image") and v != getattr(default, k)]
    if not tiling.full_image:
        parts.append("no-full-image")
    return ",".join(parts)


@dataclass
class TileCounts:
    """The answers' "tiling" reports, summed: how many answers had one, and their tiles,
    engine images and engine runs; and the images sent again after an overloaded refusal."""

    answers: int = 0
    tiles: int = 0
    engine_images: int = 0
    engine_runs: int = 0
    retries: int = 0

    async def pause(self, attempt: int, since: float, image_id: int) -> None:
        """Before sending an image again that the detector refused as overloaded."""
        if time.perf_counter() - since > OVERLOADED_RETRY_S:
            raise RuntimeError(f"image {image_id}: still refused as overloaded after "
                               f"{OVERLOADED_RETRY_S:.0f} s")
        self.retries += 1
        await asyncio.sleep(min(0.5, 0.01 * 2 ** attempt))

    def add(self, report: dict[str, Any] | None) -> None:
        if report is not None:
            self.answers += 1
            self.tiles += len(report["tiles"])
            self.engine_images += report["engine_images"]
            self.engine_runs += report["engine_runs"]

    def summary(self) -> dict[str, Any]:
        """The retries, and means per tiled answer (none when no answer had a "tiling")."""
        if not self.answers:
            return {"overloaded_retries": self.retries}
        n = self.answers
        return {"overloaded_retries": self.retries,
                "tiled_images": n, "tiles_per_image": round(self.tiles / n, 2),
                "engine_images_per_image": round(self.engine_images / n, 2),
                "engine_runs_per_image": round(self.engine_runs / n, 2)}


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


async def _detect_over_http(target: Target, images: list[tuple[int, bytes]], concurrency: int,
                            headers: dict[str, str], bar: ProgressBar, counts: TileCounts
                            ) -> dict[int, list[dict[str, Any]]]:
    assert target.url is not None
    endpoint = Endpoint.parse(target.url)
    query = {"score_threshold": repr(target.score_threshold),
             "max_detections": str(ALL["max_detections"]), **tile_query(target.tiling)}
    path = "/detect?" + urlencode(query)
    pending = list(reversed(images))
    found: dict[int, list[dict[str, Any]]] = {}

    async def client() -> None:
        connection = Connection(endpoint.host, endpoint.port, headers)
        try:
            while pending:
                image_id, body = pending.pop()
                since = time.perf_counter()
                for attempt in itertools.count():
                    status, payload = await connection.request("POST", path, body,
                                                               content_type(body))
                    if status != 503 or b'"overloaded"' not in payload:
                        break
                    await counts.pause(attempt, since, image_id)
                if status != 200:
                    raise RuntimeError(f"image {image_id}: HTTP {status} {payload[:200]!r}")
                answer = orjson.loads(payload)
                found[image_id] = answer["detections"]
                counts.add(answer.get("tiling"))
                bar(1)
        finally:
            connection.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return found


async def _detect_in_process(target: Target, images: list[tuple[int, bytes]],
                             concurrency: int, bar: ProgressBar, counts: TileCounts
                             ) -> dict[int, list[dict[str, Any]]]:
    settings = Settings(model_path=target.model, providers=target.providers,
                        **target.overrides)  # type: ignore[arg-type]  # pydantic converts
    engine = await asyncio.to_thread(OnnxEngine.load, settings)
    detector = Detector(engine, settings, Metrics().for_version(engine.info.name, 1))
    await asyncio.to_thread(detector.warm_up)
    detector.start()
    tiling = (detector.default_tiling if target.tiling is None
              else None if target.tiling == "none" else target.tiling)
    params = DetectParams(score_threshold=target.score_threshold,
                          max_detections=int(ALL["max_detections"]), clip=settings.clip_boxes,
                          dedupe_iou=settings.dedupe_iou, tiling=tiling)
    pending = list(reversed(images))
    found: dict[int, list[dict[str, Any]]] = {}

    async def client() -> None:
        while pending:
            image_id, body = pending.pop()
            since = time.perf_counter()
            for attempt in itertools.count():
                try:
                    result = await detector.detect(body, params)
                    break
                except Overloaded:
                    await counts.pause(attempt, since, image_id)
            found[image_id] = [
                {"label": d.label, "class_id": d.class_id, "score": d.score,
                 "box": dict(zip(("x1", "y1", "x2", "y2"), d.box))}
                for d in result.detections]
            counts.add(None if result.tiling is None else result.tiling.json())
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
    counts = TileCounts()
    started = time.perf_counter()
    if target.url:
        headers = {"X-API-Key": api_key} if api_key else {}
        found = asyncio.run(_detect_over_http(target, images, concurrency, headers, bar,
                                              counts))
    else:
        assert target.model is not None
        found = asyncio.run(_detect_in_process(target, images, concurrency, bar, counts))
    elapsed = time.perf_counter() - started
    bar.close()
    results = [r for image_id, dets in found.items()
               for r in _to_results(image_id, dets, category_of, sorted_ids)]
    metrics = coco_metrics(annotations, results, [e["id"] for e in entries] if limit else None)
    tiling = target.tiling if target.tiling is None or target.tiling == "none" else asdict(
        target.tiling)
    return {"target": target.name, **metrics, "images": len(images),
            "images_per_s": round(len(images) / elapsed, 2), "data": str(data),
            "score_threshold": target.score_threshold, "tiling": tiling, **counts.summary()}


def _settings(pairs: list[str], precision: str | None) -> dict[str, str]:
    overrides = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    if len(overrides) != len(pairs):
        raise SystemExit("--set and --compare-set take SETTING=VALUE")
    if precision:
        overrides["precision"] = precision
    return overrides


def _in_process(model: Path, providers: str, overrides: dict[str, str],
                tiling: TileRequest = None) -> Target:
    """A target named by what tells it apart: model, providers, precision, other settings,
    tiling."""
    name = ":".join([model.name, providers, overrides.get("precision", "fp32"),
                     *(f"{k}={v}" for k, v in sorted(overrides.items()) if k != "precision"),
                     *filter(None, [tile_label(tiling)])])
    return Target(name, model=model, providers=providers, overrides=overrides, tiling=tiling)


def _service(name: str, url: str, tiling: TileRequest = None) -> Target:
    return Target(":".join(filter(None, [name, tile_label(tiling)])), url=url, tiling=tiling)


def _tile_arg(text: str) -> int | Literal["auto", "none"]:
    """``--tile``: parse_tile's values, "none" kept (it is sent: a service's TILE may tile)."""
    try:
        tile = parse_tile(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return "none" if tile is None else tile


def tilings(args: argparse.Namespace) -> tuple[TileRequest, TileRequest]:
    """The first target's and ``--compare-tile``'s tiling from the options (validated by
    Tiling); ``--tile-*`` options need a tile to apply to."""
    options = {"overlap": args.tile_overlap, "merge": args.tile_merge,
               "merge_threshold": args.tile_merge_threshold,
               "merge_metric": args.tile_merge_metric, "full_image": args.tile_full_image,
               "class_aware": None if args.tile_class_agnostic is None
               else not args.tile_class_agnostic}
    given = {k: v for k, v in options.items() if v is not None}
    if given and args.tile in (None, "none") and args.compare_tile in (None, "none"):
        raise SystemExit("dfine-serve eval: --tile-* options need --tile (or --compare-tile) "
                         "auto or a size")

    def build(tile: int | Literal["auto", "none"] | None) -> TileRequest:
        if tile is None or tile == "none":
            return tile
        try:
            return replace(Tiling(tile), **given)
        except ValueError as exc:
            raise SystemExit(f"dfine-serve eval: {exc}") from None

    return build(args.tile), build(args.compare_tile)


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
    tiles = p.add_argument_group(
        "tiled inference", "sent as the service's tile* query parameters, or in-process as "
        "DetectParams.tiling; every --tile-* option needs --tile or --compare-tile")
    tiles.add_argument("--tile", type=_tile_arg, metavar="auto|none|PIXELS",
                       help="tile every image (default: the service's TILE setting; "
                            "in-process --set tile=...)")
    tiles.add_argument("--compare-tile", type=_tile_arg, metavar="auto|none|PIXELS",
                       help="also evaluate the first target with this tile")
    tiles.add_argument("--tile-overlap", type=float, metavar="F",
                       help=f"overlap of neighbouring tiles, 0 to 0.9 ({DEFAULT_OVERLAP})")
    tiles.add_argument("--tile-merge", choices=MERGE_METHODS,
                       help=f"merging of the tiles' detections ({DEFAULT_MERGE})")
    tiles.add_argument("--tile-merge-threshold", type=float, metavar="F",
                       help=f"overlap at which detections merge ({DEFAULT_MERGE_THRESHOLD})")
    tiles.add_argument("--tile-merge-metric", choices=MATCH_METRICS,
                       help=f"ios or iou ({DEFAULT_MERGE_METRIC})")
    tiles.add_argument("--tile-full-image", action=argparse.BooleanOptionalAction,
                       help="run the whole image too and merge (default: on)")
    tiles.add_argument("--tile-class-agnostic", action="store_true", default=None,
                       help="merge detections of different classes too")
    p.add_argument("--score-threshold", type=float, default=0.0, metavar="F",
                   help="detections kept per image (0: all, as AP wants; tiled merging "
                        "absorbs only what is above it)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.add_argument("--api-key")
    p.add_argument("--out", type=Path, help="write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        raise SystemExit("dfine-serve eval: --score-threshold must be in [0, 1]")
    overrides = _settings(args.set, args.precision)
    tiling, compare_tiling = tilings(args)
    first = (_service("service", args.url, tiling) if args.url
             else _in_process(args.model, args.providers, overrides, tiling))
    targets = [first]
    compares = [args.compare_url, args.compare_model, args.compare_providers,
                args.compare_precision, args.compare_set]
    if args.compare_tile is not None:
        if any(compares):
            raise SystemExit("dfine-serve eval: --compare-tile compares the first target with "
                             "itself: no other --compare-* option with it")
        targets.append(_service("service", args.url, compare_tiling) if args.url
                       else _in_process(args.model, args.providers, overrides, compare_tiling))
    elif args.compare_url:
        targets.append(_service("compare-service", args.compare_url, tiling))
    elif (args.compare_model or args.compare_providers or args.compare_precision
          or args.compare_set):
        model = args.compare_model or args.model
        if model is None:
            raise SystemExit("--compare-providers, --compare-precision and --compare-set need "
                             "--model or --compare-model")
        targets.append(_in_process(model, args.compare_providers or args.providers, {
            **overrides, **_settings(args.compare_set, args.compare_precision)}, tiling))
    if args.score_threshold:  # a part of the name: it changes what is measured
        for target in targets:
            target.score_threshold = args.score_threshold
            target.name += f":score>={args.score_threshold}"
    try:
        rows = [evaluate(t, args.data, args.concurrency, args.limit, args.api_key)
                for t in targets]
    except (ServiceError, OSError, RuntimeError, ValueError) as exc:
        raise SystemExit(f"dfine-serve eval: error: {exc}") from exc
    report: dict[str, Any] = {"results": rows}
    tiled = any("tiles_per_image" in row for row in rows)
    extra = " tiles/image | engine images/image |" if tiled else ""
    print("| target | " + " | ".join(METRIC_NAMES) + " | images/s |" + extra)
    print("|---|" + "---|" * (len(METRIC_NAMES) + 1 + 2 * tiled))
    for row in rows:
        counts = (f" {row.get('tiles_per_image', '-')} | "
                  f"{row.get('engine_images_per_image', '-')} |") if tiled else ""
        print(f"| {row['target']} | " + " | ".join(f"{row[m]:.4f}" for m in METRIC_NAMES)
              + f" | {row['images_per_s']} |" + counts)
    if len(rows) == 2:
        report["difference"] = {m: round(rows[1][m] - rows[0][m], 4) for m in METRIC_NAMES}
        print("difference (second - first): " + json.dumps(report["difference"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
