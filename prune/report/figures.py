"""The report's figures, drawn with matplotlib's object API (no pyplot state, no backend switch)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from attribution.core.io import atomic_output
from attribution.scores import HeadScores
from prune.pipeline.artifacts import PruneRun
from prune.workflow import SweepResult


def _save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def plot_heatmaps(
    scores: dict[str, HeadScores], path: Path, removed: dict[int, list[int]] | None = None, chosen: str | None = None
) -> Path:
    """Every criterion's ``[L, H]`` heatmap side by side; heads removed from the final model get an x."""
    names = list(scores)
    layers, heads = next(iter(scores.values())).shape
    cols = min(len(names), 5 if heads <= 8 else 3)  # wide layers get bigger panels
    rows = (len(names) + cols - 1) // cols
    width = max(2.6, 0.32 * heads + 1.4)
    fig = Figure(figsize=(width * cols, (0.32 * layers + 1.3) * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        title = f"{name} (final)" if name == chosen else name
        scores[name].plot(ax=ax, title=title)
        ax.set_xticks(range(0, heads, max(1, heads // 6)))
        for layer, layer_heads in (removed or {}).items():
            for head in layer_heads:
                ax.plot(head, layer, marker="x", color="red", markersize=5, markeredgewidth=1.2)
    fig.suptitle("Head importance by criterion (x = removed in the final model)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(sweep: SweepResult, path: Path, prune: PruneRun | None = None, max_drop: float | None = None) -> Path:
    """Metric vs fraction of heads removed: one line per criterion, the dense line, the tolerance."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    dense = sweep.dense
    markers = "osD^v<>p*h"
    for i, (name, points) in enumerate(sweep.curves.items()):
        xs = [0.0] + [p.fraction for p in points if p.metric is not None]
        ys = [dense] + [p.metric for p in points if p.metric is not None]
        style = "--" if name == "random" else "-"
        width = 2.2 if prune and prune.decision.criterion == name else 1.3
        ax.plot(xs, ys, style, marker=markers[i % len(markers)], markersize=4, linewidth=width, label=name)
    ax.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.3f})")
    if max_drop is not None:
        ax.axhline(dense - max_drop, color="gray", linestyle=":", linewidth=1, label=f"dense - {max_drop:g}")
    if prune and prune.heads_removed:
        ax.axvline(prune.fraction, color="crimson", linestyle=":", linewidth=1.2, label=f"final ({prune.fraction:.0%})")
    ax.set_xlabel("fraction of heads removed")
    ax.set_ylabel(f"{sweep.metric} ({sweep.split}, {sweep.examples} rows)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Pruning curves (heads removed, no repair)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
