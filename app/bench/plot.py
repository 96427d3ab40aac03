"""A PNG plot of throughput, p99 latency and (where measured) GPU busy time against
concurrency, drawn with OpenCV (no plotting library in the service's dependencies)."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np

from app.bench.stats import RunResult

COLORS = {"service": (200, 90, 30), "ceiling": (60, 160, 60), "peer": (40, 40, 220)}
PANEL_WIDTH, HEIGHT, MARGIN = 550, 460, 70


def _panel(canvas: np.ndarray, x0: int, title: str, series: dict[str, list[tuple[float, float]]],
           unit: str) -> None:
    w, h = PANEL_WIDTH - MARGIN - 20, HEIGHT - 2 * MARGIN
    points = [p for values in series.values() for p in values]
    if not points:
        return
    xs = sorted({p[0] for p in points})
    y_max = max(p[1] for p in points) * 1.15 or 1.0
    cv2.putText(canvas, f"{title} ({unit})", (x0, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                (0, 0, 0), 2)
    cv2.rectangle(canvas, (x0, MARGIN), (x0 + w, MARGIN + h), (0, 0, 0), 1)

    def at(x: float, y: float) -> tuple[int, int]:
        col = xs.index(x) / max(1, len(xs) - 1)
        return int(x0 + col * w), int(MARGIN + h - y / y_max * h)

    for x in xs:
        px, _ = at(x, 0)
        cv2.putText(canvas, f"{x:g}", (px - 10, MARGIN + h + 22), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5, (0, 0, 0), 1)
    for k in range(5):
        y = y_max * k / 4
        _, py = at(xs[0], y)
        cv2.putText(canvas, f"{y:.0f}", (x0 - 55, py + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1)
        cv2.line(canvas, (x0, py), (x0 + w, py), (225, 225, 225), 1)
    cv2.putText(canvas, "concurrency", (x0 + w // 3, MARGIN + h + 48),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    for row, (name, values) in enumerate(series.items()):
        color = COLORS.get(name, (0, 0, 0))
        pts = [at(x, y) for x, y in sorted(values)]
        for a, b in itertools.pairwise(pts):
            cv2.line(canvas, a, b, color, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(canvas, p, 4, color, -1, cv2.LINE_AA)
        cv2.putText(canvas, name, (x0 + 10, MARGIN + 20 + 20 * row), cv2.FONT_HERSHEY_SIMPLEX,
                    0.55, color, 2)


def write_plot(results: list[RunResult], path: Path) -> Path:
    closed = [r for r in results if r.mode == "closed"]
    targets = sorted({r.target for r in closed})
    panels = [("Throughput", "requests/s", {t: [(r.load, r.throughput_rps) for r in closed
                                                  if r.target == t] for t in targets}),
              ("p99 latency", "ms", {t: [(r.load, r.latency_ms["p99"]) for r in closed
                                         if r.target == t] for t in targets})]
    busy = {t: [(r.load, r.gpu_busy_pct) for r in closed
                if r.target == t and r.gpu_busy_pct is not None] for t in targets}
    if any(busy.values()):
        panels.append(("GPU busy", "%", {t: v for t, v in busy.items() if v}))
    canvas = np.full((HEIGHT, PANEL_WIDTH * len(panels), 3), 255, np.uint8)
    for index, (title, unit, series) in enumerate(panels):
        _panel(canvas, index * PANEL_WIDTH + MARGIN, title, series, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
    return path
