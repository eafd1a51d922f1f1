"""The run report: ``report.md`` and a self-contained ``report.html`` (PNGs embedded as base64).

Built only from the files a recipe run leaves in its output directory (``scores/*.json``,
``sweep.json``, ``dense.json``, ``prune.json``, ``repair.json``, ``cost.json``, ``export.json``,
``recipe.yaml``), so it can be rebuilt at any time with :func:`write_report`. Every section is
optional: a recipe without a sweep simply has no curves.

Contents: a one-paragraph verdict; the final-model table (heads kept per layer, metric dense /
pruned / repaired, parameters, attention FLOPs, PyTorch and ONNX latency at each batch size, file
size; dense vs pruned); how to reload the pruned model (CLI and Python); every criterion's head
heatmap side by side (heads removed from the final model marked); the pruning curves (metric vs
fraction of heads removed, one line per criterion, the dense line and the tolerance); rank
agreement between criteria; the repair per layer; the recipe, command, stage times and machine.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attribution.core.io import atomic_write_text
from attribution.scores import HeadScores

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", path, alt) | ("code", lang, text)


@dataclass
class WrittenReport:
    """Paths written (report.md, report.html, figures) and the final-model summary numbers."""

    files: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Reading the run
# --------------------------------------------------------------------------------------------


# which stage writes each file: with ``stages`` given, files of other stages (left over from an
# earlier run of another recipe in the same directory) are ignored
_OWNER = {
    "finetune.json": "finetune",
    "dense.json": "dense",
    "sweep.json": "sweep",
    "prune.json": "prune",
    "repair.json": "prune",
    "cost.json": "cost",
    "export.json": "export",
}


def _read(out: Path, name: str, stages: Collection[str] | None = None) -> Any:
    path = out / name
    if not path.is_file() or (stages is not None and _OWNER.get(name) not in stages):
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _scores(out: Path, stages: Collection[str] | None = None) -> dict[str, HeadScores]:
    found = {}
    for path in sorted((out / "scores").glob("*.json")):
        if stages is None or f"score-{path.stem}" in stages:
            found[path.stem] = HeadScores.load(path)
    return found


def _order(found: dict[str, HeadScores], recipe: dict[str, Any] | None) -> list[str]:
    wanted = list(((recipe or {}).get("score") or {}).get("criteria", {})) or list(found)
    return [c for c in wanted if c in found] + [c for c in found if c not in wanted]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(
    scores: dict[str, HeadScores], path: Path, removed: dict[int, list[int]] | None = None, chosen: str | None = None
) -> Path:
    """Every criterion's ``[L, H]`` heatmap side by side; heads removed from the final model get an x."""
    plt = _plt()
    names = list(scores)
    layers, heads = next(iter(scores.values())).shape
    cols = min(len(names), 5 if heads <= 8 else 3)  # wide layers get bigger panels
    rows = (len(names) + cols - 1) // cols
    width = max(2.6, 0.32 * heads + 1.4)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, (0.32 * layers + 1.3) * rows), squeeze=False)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(
    sweep: dict[str, Any], path: Path, prune: dict[str, Any] | None = None, max_drop: float | None = None
) -> Path:
    """Metric vs fraction of heads removed: one line per criterion, the dense line, the tolerance."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = sweep["dense"]
    markers = "osD^v<>p*h"
    for i, (name, points) in enumerate(sweep["curves"].items()):
        xs = [0.0] + [p["fraction"] for p in points if p["metric"] is not None]
        ys = [dense] + [p["metric"] for p in points if p["metric"] is not None]
        style = "--" if name == "random" else "-"
        width = 2.2 if prune and prune.get("criterion") == name else 1.3
        ax.plot(xs, ys, style, marker=markers[i % len(markers)], markersize=4, linewidth=width, label=name)
    ax.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.3f})")
    if max_drop is not None:
        ax.axhline(dense - max_drop, color="gray", linestyle=":", linewidth=1, label=f"dense - {max_drop:g}")
    if prune and prune.get("heads_removed"):
        ax.axvline(
            prune["fraction"], color="crimson", linestyle=":", linewidth=1.2, label=f"final ({prune['fraction']:.0%})"
        )
    ax.set_xlabel("fraction of heads removed")
    ax.set_ylabel(f"{sweep['metric']} ({sweep['split']}, {sweep['examples']} rows)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Pruning curves (heads removed, no repair)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Building the blocks
# --------------------------------------------------------------------------------------------


def _fmt_int(value: Any) -> str:
    return f"{int(value):,}" if value is not None else "–"


def _fmt_ms(value: Any) -> str:
    return f"{value:.1f} ms" if value is not None else "–"


def _fmt_count(value: float) -> str:
    """1.2 G / 34.5 M / 6.7 K: operation counts at a readable scale."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"


def _fmt_mb(value: Any) -> str:
    return f"{value / 1e6:.1f} MB" if value else "–"


def _ratio(a: Any, b: Any, fmt: str = "{:.2f}×") -> str:
    try:
        return fmt.format(a / b) if a and b else ""
    except (TypeError, ZeroDivisionError):
        return ""


def _final_table(
    prune: dict[str, Any] | None,
    dense_eval: dict[str, Any] | None,
    cost: dict[str, Any] | None,
    export: dict[str, Any] | None,
) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    headers = ["", "dense", "pruned", "change"]
    rows: list[list[str]] = []
    summary: dict[str, Any] = {}
    if prune:
        total = prune["total_heads"]
        layers = len(prune["kept_per_layer"])
        per = total // layers
        rows.append(["heads", str(total), str(total - prune["heads_removed"]), f"−{prune['fraction']:.0%}"])
        rows.append(
            ["heads kept per layer", " ".join([str(per)] * layers), " ".join(map(str, prune["kept_per_layer"])), ""]
        )
        metrics = prune["metrics"]
        split = f"{prune['split']}, {prune['examples']} rows"
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
            criterion=prune["criterion"],
            heads_removed=prune["heads_removed"],
            total_heads=total,
            fraction=prune["fraction"],
            kept_per_layer=prune["kept_per_layer"],
            metrics=metrics,
        )
    elif dense_eval:
        for name, value in dense_eval["metrics"].items():
            rows.append([f"{name} ({dense_eval['split']})", f"{value:.4f}", "–", ""])
    if cost:
        d, p = cost["dense"], cost["pruned"]
        rows.append(
            ["parameters", _fmt_int(d["params"]), _fmt_int(p["params"]), f"−{1 - p['params'] / d['params']:.1%}"]
        )
        rows.append(
            [
                f"attention FLOPs (multiply-adds / example, T={d['mean_length']:.1f})",
                _fmt_count(d["attention_flops"]),
                _fmt_count(p["attention_flops"]),
                f"−{1 - p['attention_flops'] / d['attention_flops']:.0%}" if d["attention_flops"] else "",
            ]
        )
        rows.append(
            [
                "total FLOPs (predicted speed-up)",
                _fmt_count(d["total_flops"]),
                _fmt_count(p["total_flops"]),
                _ratio(d["total_flops"], p["total_flops"]),
            ]
        )
        for size in d["latency_ms"]:
            dl, pl = d["latency_ms"][size], p["latency_ms"].get(size)
            rows.append([f"PyTorch latency, batch {size} (median)", _fmt_ms(dl), _fmt_ms(pl), _ratio(dl, pl)])
            if export and "pruned" in export:
                od = export.get("dense", {}).get("latency_ms", {}).get(str(size))
                op = export["pruned"].get("latency_ms", {}).get(str(size))
                rows.append([f"ONNX Runtime latency, batch {size}", _fmt_ms(od), _fmt_ms(op), _ratio(od, op)])
        rows.append(
            [
                "weights file size",
                _fmt_mb(d.get("file_bytes")),
                _fmt_mb(p.get("file_bytes")),
                _ratio(d.get("file_bytes"), p.get("file_bytes")),
            ]
        )
        summary["cost"] = {
            "params": [d["params"], p["params"]],
            "attention_flops": [d["attention_flops"], p["attention_flops"]],
            "latency_ms": {s: [d["latency_ms"][s], p["latency_ms"].get(s)] for s in d["latency_ms"]},
            "file_bytes": [d.get("file_bytes"), p.get("file_bytes")],
        }
    if export:
        dense_file = export.get("dense", {}).get("file_bytes")
        pruned_file = export.get("pruned", {}).get("file_bytes")
        rows.append(["ONNX file size", _fmt_mb(dense_file), _fmt_mb(pruned_file), _ratio(dense_file, pruned_file)])
        worst = max(v["max_abs_diff"] for v in export.values())
        rows.append(
            [
                "max |ONNX − PyTorch| logit",
                *(f"{export[k]['max_abs_diff']:.1e}" if k in export else "–" for k in ("dense", "pruned")),
                "",
            ]
        )
        summary["onnx"] = {k: {"latency_ms": v["latency_ms"], "file_bytes": v["file_bytes"]} for k, v in export.items()}
        summary["onnx_max_abs_diff"] = worst
    return headers, rows, summary


def _reload_blocks(
    out: Path, prune: dict[str, Any] | None, export: dict[str, Any] | None, recipe: dict[str, Any] | None
) -> list[Block]:
    if not prune:
        return []
    model_dir = (out / prune.get("model_dir", "model")).resolve()
    data = (recipe or {}).get("data", {}).get("name", "tweets")
    max_length = (recipe or {}).get("data", {}).get("max_length", 64)
    split = prune.get("split", "test")
    blocks: list[Block] = [
        ("h", 2, "Reload the pruned model"),
        ("p", "Command line — re-evaluate it, or export it again:"),
        (
            "code",
            "bash",
            f"headprune evaluate --model {model_dir} --data {data} --split {split} --max-length {max_length}\n"
            f"headprune export --model {model_dir} --format onnx --out model.onnx",
        ),
        (
            "p",
            "Python — `load_pruned` rebuilds the pruned architecture from `config.json` "
            "(`headprune_kept_heads`) and loads the weights:",
        ),
        (
            "code",
            "python",
            "from prune import load_pruned\n\n"
            f'model, tokenizer = load_pruned("{model_dir}")\n'
            'batch = tokenizer(["what a great day"], return_tensors="pt")\n'
            "probabilities = model(**batch).logits.softmax(-1)",
        ),
    ]
    if export and "pruned" in export:
        onnx_path = (out / export["pruned"]["path"]).resolve()
        names = ", ".join(f'"{n}"' for n in export["pruned"].get("inputs", ["input_ids", "attention_mask"]))
        blocks += [
            ("p", "ONNX Runtime (dynamic batch and sequence axes):"),
            (
                "code",
                "python",
                "import onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
                f'session = ort.InferenceSession("{onnx_path}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{model_dir}")\n'
                'batch = tokenizer(["what a great day"], return_tensors="np")\n'
                f'logits = session.run(["logits"], {{name: batch[name] for name in ({names})}})[0]',
            ),
        ]
    return blocks


def _verdict(
    prune: dict[str, Any] | None,
    cost: dict[str, Any] | None,
    export: dict[str, Any] | None,
    model: str,
) -> str:
    if not prune:
        return f"Head importance of {model} by several criteria (no final pruning requested)."
    metrics = prune["metrics"]
    final = metrics.get("repaired", metrics["pruned"])
    name = next(iter(metrics["dense"]))
    how = f"ranked by **{prune['criterion']}**"
    if prune.get("chosen_by") == "best":
        others = [c for c in prune.get("candidates", []) if c != prune["criterion"]]
        if others:
            how += f" (the criterion that allowed the most pruning; also tried: {', '.join(others)})"
    text = (
        f"Removed **{prune['heads_removed']} of {prune['total_heads']} attention heads "
        f"({prune['fraction']:.0%})** from {model}, {how}: {prune['reason']}. "
        f"{name.capitalize()} on {prune['split']} ({prune['examples']} rows): "
        f"{metrics['dense'][name]:.4f} dense → {metrics['pruned'][name]:.4f} pruned"
    )
    if "repaired" in metrics:
        text += f" → {metrics['repaired'][name]:.4f} after repair"
    text += f" ({final[name] - metrics['dense'][name]:+.4f})."
    if cost:
        ratios = cost.get("ratios", {})
        speed = ratios.get("measured_speedup", {})
        parts = [f"attention FLOPs −{1 - cost['pruned']['attention_flops'] / cost['dense']['attention_flops']:.0%}"]
        if ratios.get("predicted_speedup"):
            parts.append(f"predicted speed-up {ratios['predicted_speedup']:.2f}×")
        if speed:
            measured = " and ".join(f"{v:.2f}× at batch {k}" for k, v in speed.items())
            parts.append(f"measured in PyTorch {measured}")
        if export and "dense" in export and "pruned" in export:
            dense_ms, pruned_ms = export["dense"]["latency_ms"], export["pruned"]["latency_ms"]
            onnx = [f"{dense_ms[k] / pruned_ms[k]:.2f}×" for k in pruned_ms if k in dense_ms and pruned_ms[k]]
            if onnx:
                parts.append(f"in ONNX Runtime {' and '.join(onnx)}")
        text += " Cost: " + ", ".join(parts) + "."
    return text


def _score_table(scores: dict[str, HeadScores], order: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["criterion", "examples", "options", "time", "completeness error (median / p90)"]
    rows = []
    for name in order:
        prov = scores[name].provenance
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


def _spearman_table(scores: dict[str, HeadScores], order: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = [""] + order
    rows = [[a] + [f"{scores[a].spearman(scores[b]):.2f}" for b in order] for a in order]
    return headers, rows


def _curve_table(sweep: dict[str, Any], max_drop: float | None) -> tuple[list[str], list[list[str]]]:
    """Metric per criterion and fraction, plus two summaries: the mean over the swept fractions
    (area under the curve, higher = better ranking) and the largest fraction within ``max_drop``."""
    fractions = sweep["fractions"]
    tolerance = 0.01 if max_drop is None else max_drop
    headers = ["criterion"] + [f"{f:.0%}" for f in fractions] + ["mean", f"max within {tolerance:g}"]
    rows = [["dense", *[f"{sweep['dense']:.3f}"] * len(fractions), f"{sweep['dense']:.3f}", ""]]
    for name, points in sweep["curves"].items():
        by_fraction = {p["fraction"]: p["metric"] for p in points}
        values = [by_fraction.get(f) for f in fractions]
        known = [v for v in values if v is not None]
        ok = [
            f
            for f, v in zip(fractions, values, strict=True)
            if v is not None and v >= sweep["dense"] - tolerance - 1e-12
        ]
        rows.append(
            [name]
            + [f"{v:.3f}" if v is not None else "–" for v in values]
            + [f"{sum(known) / len(known):.3f}" if known else "–", f"{max(ok):.0%}" if ok else "none"]
        )
    return headers, rows


def build_blocks(
    out: Path,
    *,
    title: str,
    recipe: dict[str, Any] | None = None,
    command: str | None = None,
    timings: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    stages: Collection[str] | None = None,
) -> tuple[list[Block], dict[str, Any]]:
    """The report as a list of blocks (rendered to Markdown and HTML) plus the summary numbers.

    ``stages``: the stages of this run (default: use every run file present in ``out``).
    """
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    dense_eval, sweep, prune = (_read(out, f, stages) for f in ("dense.json", "sweep.json", "prune.json"))
    repair, cost, export = (_read(out, f, stages) for f in ("repair.json", "cost.json", "export.json"))
    scores = _scores(out, stages)
    order = _order(scores, recipe)
    model = f"`{(recipe or {}).get('model', 'the model')}`"
    if (recipe or {}).get("finetune"):
        model = f"{model} fine-tuned on {recipe.get('data', {}).get('name', 'the data')}"
    blocks: list[Block] = [("h", 1, title), ("p", _verdict(prune, cost, export, model))]

    headers, rows, summary = _final_table(prune, dense_eval, cost, export)
    if rows:
        heading = "Final model: dense vs pruned" if prune else "Dense model"
        blocks += [("h", 2, heading), ("table", headers, rows)]
        notes = []
        if cost:
            threads = cost["dense"].get("threads")
            notes.append(
                f"Latency: median of {cost['dense'].get('latency_repeats')} forward passes on {threads} CPU thread(s), "
                "dense and pruned interleaved; ONNX Runtime timed on the same batches."
            )
        if prune and prune.get("reload_max_abs_diff") is not None:
            diff = prune["reload_max_abs_diff"]
            notes.append(
                "The saved checkpoint reloads to "
                + ("exactly the logits" if diff == 0 else f"logits within {diff:.1e}")
                + " of the in-memory pruned model."
            )
        if notes:
            blocks.append(("p", " ".join(notes)))
    blocks += _reload_blocks(out, prune, export, recipe)

    if scores:
        removed = {int(k): v for k, v in (prune or {}).get("removed", {}).items()}
        path = plot_heatmaps(
            {n: scores[n] for n in order}, figures / "heatmaps.png", removed, (prune or {}).get("criterion")
        )
        blocks += [
            ("h", 2, "Head importance"),
            (
                "p",
                "Each panel is one criterion's score for every head (rows: layers, bottom = first; columns: heads; "
                "brighter = more important, each panel on its own scale). Crosses mark the heads the final model lost.",
            ),
            ("img", path, "head-importance heatmaps"),
            ("table", *_score_table(scores, order)),
        ]
        if len(order) > 1:
            blocks += [
                ("p", "Rank agreement between criteria (Spearman correlation over all heads):"),
                ("table", *_spearman_table(scores, order)),
            ]
    if sweep:
        max_drop = (((recipe or {}).get("prune") or {}).get("target") or {}).get("max_drop")
        path = plot_curves(sweep, figures / "curves.png", prune, max_drop)
        blocks += [
            ("h", 2, "Pruning curves"),
            (
                "p",
                f"{sweep['metric'].capitalize()} on {sweep['examples']} {sweep['split']} rows "
                "(disjoint from the scoring rows) "
                "after removing the lowest-ranked fraction of all heads, for each criterion; no repair.",
            ),
            ("img", path, "pruning curves"),
            ("table", *_curve_table(sweep, max_drop)),
        ]
    if repair:
        blocks += [
            ("h", 2, "Repair"),
            (
                "p",
                "Least-squares rescaling of the surviving heads of each pruned layer on "
                f"{repair['examples']} calibration rows "
                f"({repair['seconds']:.1f} s); relative reconstruction error of the attention output before → after:",
            ),
            (
                "table",
                ["layer", "heads kept", "error before", "error after", "scales"],
                [
                    [
                        str(layer["layer"]),
                        str(len(layer["heads"])),
                        f"{layer['error_before'] / layer['target_energy']:.4f}" if layer["target_energy"] else "–",
                        f"{layer['error_after'] / layer['target_energy']:.4f}" if layer["target_energy"] else "–",
                        f"{min(layer['scales']):.3f} … {max(layer['scales']):.3f}",
                    ]
                    for layer in repair["layers"]
                ],
            ),
        ]
    analysis = _analysis_files(out, stages)
    if analysis:
        if not scores and not prune:
            blocks[1] = ("p", f"Interpretation of {model} (no head scoring or pruning requested).")
        blocks += [
            ("h", 2, "Analysis"),
            (
                "p",
                "Attribution trees (AttAttr §4) and mined trigger patterns with their attack (AttAttr §5) of the "
                "dense model: " + ", ".join(f"`{f}`" for f in analysis) + ".",
            ),
        ]
    blocks.append(("h", 2, "Run"))
    finetune = _read(out, "finetune.json", stages)
    if finetune:
        test = ((finetune.get("metrics") or {}).get("test") or {}).get("accuracy")
        text = f"Model: fine-tuned classifier at `{finetune['path']}`"
        if finetune.get("train_seconds") is not None:
            text += f", trained once in {finetune['train_seconds']:.0f} s (cached; a cold-cache run adds this time)"
        if test is not None:
            text += f"; its own evaluation: test accuracy {test:.4f}"
        blocks.append(("p", text + "."))
    if command:
        blocks += [("p", "Command:"), ("code", "bash", command)]
    if timings:
        pairs = {k: (v if isinstance(v, (tuple, list)) else (v, None)) for k, v in timings.items()}
        rows = [[k, f"{w:.1f} s", f"{c:.1f} s" if c is not None else "–"] for k, (w, c) in pairs.items()]
        total_cpu = sum(c or 0.0 for _, c in pairs.values())
        rows.append(["total", f"{sum(w for w, _ in pairs.values()):.1f} s", f"{total_cpu:.1f} s"])
        blocks += [
            ("p", "Time per stage when it last ran (wall clock, and CPU time of the process over all threads):"),
            ("table", ["stage", "wall", "CPU"], rows),
        ]
    if environment:
        blocks.append(("p", "Machine: " + ", ".join(f"{k} {v}" for k, v in environment.items()) + "."))
    if recipe:
        blocks += [
            ("p", "Recipe (defaults filled in):"),
            ("code", "yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip()),
        ]
    return blocks, summary


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _analysis_files(out: Path, stages: Collection[str] | None) -> list[str]:
    """Files of the analysis stages of this run (``analysis/trees/*``, ``analysis/triggers.json``)."""
    found = []
    if stages is None or "analysis-tree" in stages:
        found += sorted(p for p in (out / "analysis" / "trees").glob("tree-*") if p.is_file())
    if (stages is None or "analysis-triggers" in stages) and (out / "analysis" / "triggers.json").is_file():
        found.append(out / "analysis" / "triggers.json")
    return [str(p.relative_to(out)) for p in found]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out: Path) -> str:
    """Markdown with images referenced by relative path (``figures/*.png``)."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            parts.append(block[1])
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{block[2]}]({Path(block[1]).relative_to(out).as_posix()})")
        elif kind == "code":
            parts.append(f"```{block[1]}\n{block[2]}\n```")
    return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.5}
h1{font-size:1.6em;border-bottom:2px solid #e3e6ee;padding-bottom:.3em}h2{font-size:1.25em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d9dde7;padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f9}tr:nth-child(even) td{background:#fafbfd}
pre{background:#f6f8fa;border:1px solid #e3e6ee;border-radius:6px;padding:.8em;overflow-x:auto;font-size:.88em}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
img{max-width:100%;border:1px solid #eceff5;border-radius:4px}
"""


def _inline(text: str) -> str:
    """Escape, then the two Markdown inline forms the report uses: **bold** and `code`."""
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def render_html(blocks: list[Block], title: str) -> str:
    """One HTML file with the figures inlined as base64 data URIs (no external files)."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "code":
            body.append(f'<pre><code class="language-{block[1]}">{html.escape(block[2])}</code></pre>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    title: str = "headprune report",
    recipe: dict[str, Any] | None = None,
    command: str | None = None,
    timings: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    stages: Collection[str] | None = None,
) -> WrittenReport:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir`` from its run files
    (only those of ``stages`` when given)."""
    out = Path(out_dir)
    if recipe is None and (out / "recipe.yaml").is_file():
        recipe = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    blocks, summary = build_blocks(
        out, title=title, recipe=recipe, command=command, timings=timings, environment=environment, stages=stages
    )
    for name, text in (("report.md", render_markdown(blocks, out)), ("report.html", render_html(blocks, title))):
        atomic_write_text(out / name, text)
    images = [Path(b[1]) for b in blocks if b[0] == "img"]
    return WrittenReport([out / "report.md", out / "report.html", *images], summary)


def final_table_text(out_dir: str | os.PathLike[str], stages: Collection[str] | None = None) -> str:
    """The final-model table as plain text (what ``headprune run`` prints at the end)."""
    out = Path(out_dir)
    headers, rows, _ = _final_table(
        *(_read(out, f, stages) for f in ("prune.json", "dense.json", "cost.json", "export.json"))
    )
    if not rows:
        return ""
    table = [headers, *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(headers))]
    lines = [
        "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    return "\n".join(lines)
