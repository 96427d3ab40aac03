"""The bench's picture, drawn with matplotlib (the optional ``bench`` extra): throughput,
p50 and p99 latency, and (where measured) GPU busy time against concurrency, one line per
target. Without matplotlib the bench writes its JSON and table alone and says how to get the
plot."""

from __future__ import annotations

from pathlib import Path

from app.bench.stats import RunResult

INSTALL_HINT = "pip install 'dfine-serve[bench]' (matplotlib) for the plot"
# The same color for a target in every panel, and in every run's picture.
COLORS = {"service": "#1f77b4", "service-v2-http": "#17becf", "service-grpc": "#9467bd",
          "peer": "#d62728", "ceiling": "#2ca02c", "front-end": "#ff7f0e",
          "service-overload": "#8c564b"}


def write_plot(results: list[RunResult], path: Path) -> Path | None:
    """The PNG at ``path``; None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    closed = [r for r in results if r.mode == "closed"]
    targets = sorted({r.target for r in closed})
    gpu = any(r.gpu_busy_pct is not None for r in closed)
    panels = 3 + gpu
    figure, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), layout="constrained")
    loads = sorted({r.load for r in closed})
    for target in targets:
        rows = sorted((r for r in closed if r.target == target), key=lambda r: r.load)
        x = [r.load for r in rows]
        style = {"color": COLORS.get(target), "marker": "o", "label": target}
        axes[0].plot(x, [r.throughput_rps for r in rows], **style)
        axes[1].plot(x, [r.latency_ms["p50"] for r in rows], **style)
        axes[2].plot(x, [r.latency_ms["p99"] for r in rows], **style)
        if gpu:
            busy = [(r.load, r.gpu_busy_pct) for r in rows if r.gpu_busy_pct is not None]
            if busy:
                axes[3].plot(*zip(*busy), **style)
    titles = [("Throughput", "requests/s"), ("p50 latency", "ms"), ("p99 latency", "ms"),
              ("GPU busy", "%")]
    for axis, (title, unit) in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        if loads and min(loads) > 0 and max(loads) / min(loads) >= 8:
            axis.set_xscale("log", base=2)
        axis.set_xticks(loads, [f"{v:g}" for v in loads])
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
