"""The report's tables and its one-paragraph verdict, from typed run files."""

from __future__ import annotations

from typing import Any

from attribution.scores import HeadScores
from prune.pipeline.artifacts import CostRun, DenseRun, ExportRun, PruneRun
from prune.workflow import METRIC_EPS, SweepResult

Table = tuple[list[str], list[list[str]]]


def fmt_int(value: Any) -> str:
    return f"{int(value):,}" if value is not None else "–"


def fmt_ms(value: Any) -> str:
    return f"{value:.1f} ms" if value is not None else "–"


def fmt_count(value: float) -> str:
    """1.2 G / 34.5 M / 6.7 K: operation counts at a readable scale."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"


def fmt_mb(value: Any) -> str:
    return f"{value / 1e6:.1f} MB" if value else "–"


def ratio(a: Any, b: Any, fmt: str = "{:.2f}×") -> str:
    try:
        return fmt.format(a / b) if a and b else ""
    except (TypeError, ZeroDivisionError):
        return ""


def final_table(
    prune: PruneRun | None, dense: DenseRun | None, cost: CostRun | None, export: ExportRun | None
) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """Dense vs pruned: heads, metrics, parameters, FLOPs, latency, file sizes; plus the summary."""
    headers = ["", "dense", "pruned", "change"]
    rows: list[list[str]] = []
    summary: dict[str, Any] = {}
    if prune:
        total, layers = prune.total_heads, len(prune.kept)
        per = total // layers
        rows.append(["heads", str(total), str(total - prune.heads_removed), f"−{prune.fraction:.0%}"])
        rows.append(
            ["heads kept per layer", " ".join([str(per)] * layers), " ".join(map(str, prune.kept_per_layer)), ""]
        )
        metrics = prune.metrics
        split = f"{prune.split}, {prune.examples} rows"
        for name, dense_value in metrics["dense"].items():
            pruned_value = metrics["pruned"][name]
            rows.append(
                [
                    f"{name} ({split}), before repair",
                    f"{dense_value:.4f}",
                    f"{pruned_value:.4f}",
                    f"{pruned_value - dense_value:+.4f}",
                ]
            )
            if "repaired" in metrics:
                repaired = metrics["repaired"][name]
                rows.append(
                    [f"{name}, after repair", f"{dense_value:.4f}", f"{repaired:.4f}", f"{repaired - dense_value:+.4f}"]
                )
        summary.update(
            criterion=prune.decision.criterion,
            heads_removed=prune.heads_removed,
            total_heads=total,
            fraction=prune.fraction,
            kept_per_layer=prune.kept_per_layer,
            metrics=metrics,
        )
    elif dense:
        for name, value in dense.metrics.items():
            rows.append([f"{name} ({dense.split})", f"{value:.4f}", "–", ""])
    onnx = export.models if export else {}
    if cost:
        d, p = cost.dense, cost.pruned
        rows.append(["parameters", fmt_int(d.params), fmt_int(p.params), f"−{1 - p.params / d.params:.1%}"])
        rows.append(
            [
                f"attention FLOPs (multiply-adds / example, T={d.mean_length:.1f})",
                fmt_count(d.attention_flops),
                fmt_count(p.attention_flops),
                f"−{1 - p.attention_flops / d.attention_flops:.0%}" if d.attention_flops else "",
            ]
        )
        rows.append(
            [
                "total FLOPs (predicted speed-up)",
                fmt_count(d.total_flops),
                fmt_count(p.total_flops),
                ratio(d.total_flops, p.total_flops),
            ]
        )
        for size in d.latency_ms:
            dl, pl = d.latency_ms[size], p.latency_ms.get(size)
            rows.append([f"PyTorch latency, batch {size} (median)", fmt_ms(dl), fmt_ms(pl), ratio(dl, pl)])
            if "pruned" in onnx:
                od = onnx["dense"].latency_ms.get(int(size)) if "dense" in onnx else None
                op = onnx["pruned"].latency_ms.get(int(size))
                rows.append([f"ONNX Runtime latency, batch {size}", fmt_ms(od), fmt_ms(op), ratio(od, op)])
        rows.append(
            ["weights file size", fmt_mb(d.file_bytes), fmt_mb(p.file_bytes), ratio(d.file_bytes, p.file_bytes)]
        )
        summary["cost"] = {
            "params": [d.params, p.params],
            "attention_flops": [d.attention_flops, p.attention_flops],
            "latency_ms": {s: [d.latency_ms[s], p.latency_ms.get(s)] for s in d.latency_ms},
            "file_bytes": [d.file_bytes, p.file_bytes],
        }
    if onnx:
        dense_file = onnx["dense"].file_bytes if "dense" in onnx else None
        pruned_file = onnx["pruned"].file_bytes if "pruned" in onnx else None
        rows.append(["ONNX file size", fmt_mb(dense_file), fmt_mb(pruned_file), ratio(dense_file, pruned_file)])
        rows.append(
            [
                "max |ONNX − PyTorch| logit",
                *(f"{onnx[k].max_abs_diff:.1e}" if k in onnx else "–" for k in ("dense", "pruned")),
                "",
            ]
        )
        summary["onnx"] = {k: {"latency_ms": v.latency_ms, "file_bytes": v.file_bytes} for k, v in onnx.items()}
        summary["onnx_max_abs_diff"] = max(v.max_abs_diff for v in onnx.values())
    return headers, rows, summary


def verdict(prune: PruneRun | None, cost: CostRun | None, export: ExportRun | None, model: str) -> str:
    """One paragraph: what was removed, why, what it cost in accuracy and bought in speed."""
    if not prune:
        return f"Head importance of {model} by several criteria (no final pruning requested)."
    decision, metrics = prune.decision, prune.metrics
    final = prune.final_metrics
    name = next(iter(metrics["dense"]))
    how = f"ranked by **{decision.criterion}**"
    if decision.chosen_by == "best":
        others = [c for c in decision.candidates or [] if c != decision.criterion]
        if others:
            how += f" (the criterion that allowed the most pruning; also tried: {', '.join(others)})"
    text = (
        f"Removed **{prune.heads_removed} of {prune.total_heads} attention heads "
        f"({prune.fraction:.0%})** from {model}, {how}: {decision.reason}. "
        f"{name.capitalize()} on {prune.split} ({prune.examples} rows): "
        f"{metrics['dense'][name]:.4f} dense → {metrics['pruned'][name]:.4f} pruned"
    )
    if "repaired" in metrics:
        text += f" → {metrics['repaired'][name]:.4f} after repair"
    text += f" ({final[name] - metrics['dense'][name]:+.4f})."
    if cost:
        speed = cost.ratios.get("measured_speedup", {})
        parts = [f"attention FLOPs −{1 - cost.pruned.attention_flops / cost.dense.attention_flops:.0%}"]
        if cost.ratios.get("predicted_speedup"):
            parts.append(f"predicted speed-up {cost.ratios['predicted_speedup']:.2f}×")
        if speed:
            measured = " and ".join(f"{v:.2f}× at batch {k}" for k, v in speed.items())
            parts.append(f"measured in PyTorch {measured}")
        onnx = export.models if export else {}
        if "dense" in onnx and "pruned" in onnx:
            dense_ms, pruned_ms = onnx["dense"].latency_ms, onnx["pruned"].latency_ms
            times = [f"{dense_ms[k] / pruned_ms[k]:.2f}×" for k in pruned_ms if k in dense_ms and pruned_ms[k]]
            if times:
                parts.append(f"in ONNX Runtime {' and '.join(times)}")
        text += " Cost: " + ", ".join(parts) + "."
    return text


def score_table(scores: dict[str, HeadScores], order: list[str], seconds: dict[str, float] | None = None) -> Table:
    """One row per criterion; ``seconds``: each criterion's scoring time when known (a run's stage
    timings; score files do not hold times)."""
    headers = ["criterion", "examples", "options", "time", "completeness error (median / p90)"]
    rows = []
    for name in order:
        prov = {**scores[name].provenance, **({"seconds": seconds[name]} if seconds and name in seconds else {})}
        options = ", ".join(f"{k}={v}" for k, v in (prov.get("options") or {}).items()) or "–"
        error = prov.get("relative_completeness_error")
        rows.append(
            [
                name,
                str(prov.get("examples", "–")),
                options,
                f"{prov['seconds']:.1f} s" if "seconds" in prov else "–",
                f"{error['median']:.2%} / {error['p90']:.2%}" if error else "–",
            ]
        )
    return headers, rows


def spearman_table(scores: dict[str, HeadScores], order: list[str]) -> Table:
    headers = [""] + order
    rows = [[a] + [f"{scores[a].spearman(scores[b]):.2f}" for b in order] for a in order]
    return headers, rows


def curve_table(sweep: SweepResult, max_drop: float | None) -> Table:
    """Metric per criterion and fraction, plus two summaries: the mean over the swept fractions
    (area under the curve, higher = better ranking) and the largest fraction within ``max_drop``."""
    fractions = sweep.fractions
    tolerance = 0.01 if max_drop is None else max_drop
    headers = ["criterion"] + [f"{f:.0%}" for f in fractions] + ["mean", f"max within {tolerance:g}"]
    rows = [["dense", *[f"{sweep.dense:.3f}"] * len(fractions), f"{sweep.dense:.3f}", ""]]
    for name, points in sweep.curves.items():
        by_fraction = {p.fraction: p.metric for p in points}
        values = [by_fraction.get(f) for f in fractions]
        known = [v for v in values if v is not None]
        ok = [
            f
            for f, v in zip(fractions, values, strict=True)
            if v is not None and v >= sweep.dense - tolerance - METRIC_EPS
        ]
        rows.append(
            [name]
            + [f"{v:.3f}" if v is not None else "–" for v in values]
            + [f"{sum(known) / len(known):.3f}" if known else "–", f"{max(ok):.0%}" if ok else "none"]
        )
    return headers, rows
