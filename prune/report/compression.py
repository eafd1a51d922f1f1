"""The report's compression section: the final compressed model, and the accuracy–latency frontier
(dense; heads only; heads + neurons at several budgets, each unrepaired and repaired; healed; INT8),
every point measured."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from attribution.core.io import atomic_output
from prune.report.render import Block
from prune.report.run_files import RunFiles


@dataclass
class Point:
    """A frontier point as the report shows it."""

    label: str
    metric: float
    speedup: float | None  # at the frontier's largest batch size, against dense FP32 PyTorch
    latency_ms: dict[str, float]
    predicted_ms: float | None = None
    heads: int | None = None
    neurons: int | None = None
    kind: str = "pruned"  # dense | heads | neurons | healed | int8


def _kind(label: str) -> str:
    if label == "dense":
        return "dense"
    return "heads" if label.startswith("heads only") else "neurons"


def frontier_points(run: RunFiles) -> tuple[list[Point], str, str]:
    """Every measured point, the metric name and the batch size the speed-ups are read at."""
    frontier = run.frontier
    assert frontier is not None
    batch = str(max(frontier.batch_sizes))
    metric = frontier.metric
    points = [
        Point(p.label, p.metrics[metric], p.speedup.get(batch), p.latency_ms, p.predicted_ms, p.heads, p.neurons,
              _kind(p.label))
        for p in frontier.points
    ]
    final = run.compress
    compressed = next((p for p in frontier.points if final and p.heads == sum(final.heads_per_layer)
                       and p.neurons == sum(final.neurons_per_layer)), None)
    if run.heal is not None and final is not None:
        speed = compressed.speedup.get(batch) if compressed else None
        ms = compressed.latency_ms if compressed else {}
        points.append(Point("final model, healed", run.heal.metrics[metric], speed, ms, None,
                            sum(final.heads_per_layer), sum(final.neurons_per_layer), "healed"))
    if run.quantize is not None:
        result = run.quantize.result
        int8 = (result.get("int8_metrics") or {}).get(metric)
        if int8 is not None:
            speed = run.quantize.speedup_vs_torch.get(batch)
            latency = {str(k): float(v) for k, v in (result.get("int8_latency_ms") or {}).items()}
            points.append(Point("final model, INT8 ONNX", int8, speed, latency, kind="int8"))
    return points, metric, batch


def plot_frontier(points: list[Point], metric: str, batch: str, path: Path) -> Path:
    """Metric against measured speed-up, one marker style per kind of point."""
    fig = Figure(figsize=(6.6, 4.4))
    ax = fig.subplots()
    styles = {
        "dense": ("black", "s", "dense"),
        "heads": ("tab:blue", "o", "heads only"),
        "neurons": ("tab:orange", "D", "heads + neurons"),
        "healed": ("tab:green", "*", "healed"),
        "int8": ("tab:red", "P", "INT8 ONNX"),
    }
    seen: set[str] = set()
    for p in points:
        if p.speedup is None:
            continue
        color, marker, name = styles[p.kind]
        hollow = p.kind in ("heads", "neurons") and "repaired" not in p.label
        ax.plot(p.speedup, p.metric, marker=marker, color=color, markersize=8 if p.kind in ("healed", "int8") else 6,
                markerfacecolor="none" if hollow else color, linestyle="none",
                label=None if (name, hollow) in seen else name + (" (unrepaired)" if hollow else ""))
        seen.add((name, hollow))
    dense = next((p.metric for p in points if p.kind == "dense"), None)
    if dense is not None:
        ax.axhline(dense - 0.01, color="gray", linestyle=":", linewidth=1, label="dense - 1 point")
    ax.set_xlabel(f"measured speed-up over dense PyTorch (batch {batch})")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Accuracy–latency frontier (every point measured)", fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def _fmt(value: Any, pattern: str = "{:.2f}") -> str:
    return pattern.format(value) if value is not None else "–"


def compression_blocks(run: RunFiles, figures: Path) -> tuple[list[Block], dict[str, Any]]:
    """The section's blocks and its summary numbers (empty when the run did not compress)."""
    final = run.compress
    if final is None:
        return [], {}
    metric = next(iter(final.metrics["dense"]))
    dense = final.metrics["dense"][metric]
    steps = [f"{dense:.4f} dense", f"{final.metrics['pruned'][metric]:.4f} pruned"] if "pruned" in final.metrics else []
    if "repaired" in final.metrics:
        steps.append(f"{final.metrics['repaired'][metric]:.4f} after the {final.repair} repair")
    if run.heal is not None:
        steps.append(f"{run.heal.metrics[metric]:.4f} after the heal")
    target = {"latency": "of the dense latency", "flops": "of the multiply-adds"}.get(final.target, "")
    how = (f"a budget of {final.fraction:.0%} {target}" if final.target != "max_drop"
           else f"the most compression within the accuracy tolerance (budget {final.fraction:.0%} of dense latency)")
    text = (
        f"Heads and feed-forward neurons ranked together by **{final.criterion}** and chosen by Kwon et al.'s search "
        f"for {how}: **{final.heads_removed} heads and {final.neurons_removed} neurons removed** "
        f"(multiply-adds {final.flops_fraction:.0%} of dense; predicted latency {_fmt(final.predicted_ms, '{:.1f}')} "
        f"of {_fmt(final.dense_predicted_ms, '{:.1f}')} ms). {metric.capitalize()} on {final.split} "
        f"({final.examples} rows): " + " → ".join(steps) + "."
    )
    blocks: list[Block] = [("h", 2, "Compression: heads and feed-forward neurons"), ("p", text),
                           ("table", ["", "heads per layer", "neurons per layer"],
                            [["final model", " ".join(map(str, final.heads_per_layer)),
                              " ".join(map(str, final.neurons_per_layer))]])]
    summary: dict[str, Any] = {"compress": {"metrics": final.metrics, "flops_fraction": final.flops_fraction}}
    if run.frontier is not None:
        points, name, batch = frontier_points(run)
        path = plot_frontier(points, name, batch, figures / "frontier.png")
        sizes = [str(b) for b in run.frontier.batch_sizes]
        headers = ["model", "heads", "neurons", name] + [f"ms (batch {b})" for b in sizes] + \
                  [f"speed-up (batch {b})" for b in sizes] + ["predicted ms", "prediction error of the fraction"]
        rows = []
        dense = next((p for p in points if p.kind == "dense"), None)
        predicted = predicted_batch(run.frontier, batch)
        for p in points:
            error = prediction_error(p, dense, predicted)
            int8 = run.quantize.speedup_vs_torch if run.quantize is not None else None
            speedups = [_fmt(run_speedup(points, p, b, int8), "{:.2f}×") for b in sizes]
            rows.append([p.label, _fmt(p.heads, "{}"), _fmt(p.neurons, "{}"), f"{p.metric:.4f}"]
                        + [_fmt(p.latency_ms.get(b), "{:.1f}") for b in sizes] + speedups
                        + [_fmt(p.predicted_ms, "{:.1f}"), _fmt(error, "{:+.1%}")])
        blocks += [
            ("p", f"The frontier: {name} on {run.frontier.split} ({run.frontier.examples} rows) against latency "
                  f"measured side by side with the dense model ({run.frontier.threads} thread(s), median of "
                  "interleaved repeats; INT8 timed in ONNX Runtime against dense PyTorch). The latency model's "
                  f"prediction (batch {predicted}) is shown beside each measurement; its error is that of the "
                  "predicted fraction of the dense latency against the measured fraction (absolute times "
                  "drift with the load of a shared machine between stages, ratios measured side by side do not)."),
            ("img", path, "accuracy-latency frontier"),
            ("table", headers, rows),
        ]
        summary["frontier"] = [{"label": p.label, "metric": p.metric, "speedup": p.speedup} for p in points]
    if run.quantize is not None:
        blocks.append(("p", int8_text(run.quantize.result)))
    return blocks, summary


def int8_text(result: dict[str, Any]) -> str:
    """One paragraph on the INT8 model against its FP32 ONNX parent: agreement, and where the
    disagreements lie (``prune.quantize.QuantizedExport``)."""
    text = (f"INT8 (ONNX Runtime dynamic quantization) agrees with its FP32 ONNX model on "
            f"{result['agreement']:.2%} of {result['checked_examples']} rows (largest |Δlogit| "
            f"{result['max_abs_diff']:.3g}); {result['fp32_bytes'] / 1e6:.1f} MB → "
            f"{result['int8_bytes'] / 1e6:.1f} MB.")
    if "decided_rows" in result:  # QuantizedExport version 2
        text += (f" On the {result['decided_rows']:.1%} of rows whose FP32 top-2 margin exceeds twice the INT8 "
                 f"noise (99th percentile of the per-row |Δlogit|, {result['p99_abs_diff']:.3g}) it agrees on "
                 f"{result['decided_agreement']:.2%}" + (": the flips are near-ties of the FP32 model."
                                                          if result["decided_agreement"] >= 0.995 else "."))
    return text


def predicted_batch(frontier: Any, default: str) -> str:
    """The batch size the frontier's predictions are for (the latency model's), as a string key;
    ``default`` for frontier files written before it was recorded."""
    size = getattr(frontier, "predicted_batch_size", None)
    return str(size) if size is not None else default


def prediction_error(point: Point, dense: Point | None, batch: str) -> float | None:
    """``predicted fraction / measured fraction - 1``, the fractions of the dense model's latency
    (predicted by the latency model; measured side by side at ``batch``); None when either is unknown."""
    if dense is None or not point.predicted_ms or not dense.predicted_ms:
        return None
    measured, dense_measured = point.latency_ms.get(batch), dense.latency_ms.get(batch)
    if not measured or not dense_measured:
        return None
    return (point.predicted_ms / dense.predicted_ms) / (measured / dense_measured) - 1


def run_speedup(points: list[Point], point: Point, batch: str, int8: dict[str, float] | None = None) -> float | None:
    """``point``'s speed-up at ``batch`` against the dense point measured in the same run (the INT8
    point against dense PyTorch timed in the quantize stage: ``int8``)."""
    if point.kind == "int8":
        return (int8 or {}).get(batch)
    dense = next((p for p in points if p.kind == "dense"), None)
    mine = point.latency_ms.get(batch)
    base = dense.latency_ms.get(batch) if dense else None
    return base / mine if base and mine else None
