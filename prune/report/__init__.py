"""The run report: ``report.md`` and a self-contained ``report.html`` (PNGs embedded as base64).

Built only from the typed files a recipe run leaves in its output directory (``scores/*.json``,
``sweep.json``, ``dense.json``, ``prune.json``, ``repair.json``, ``cost.json``, ``export.json``,
``recipe.yaml``; see :mod:`prune.pipeline.artifacts`), so it can be rebuilt at any time with
:func:`write_report`. Every section is optional: a recipe without a sweep simply has no curves.

Contents: a one-paragraph verdict; the final-model table (heads kept per layer, metric dense /
pruned / repaired, parameters, attention FLOPs, PyTorch and ONNX latency at each batch size, file
size; dense vs pruned); how to reload the pruned model (CLI and Python); every criterion's head
heatmap side by side (heads removed from the final model marked); the pruning curves (metric vs
fraction of heads removed, one line per criterion, the dense line and the tolerance); rank
agreement between criteria; the repair per layer; the recipe, command, stage times and machine.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attribution.core.io import atomic_write_text
from prune.report.compression import compression_blocks
from prune.report.figures import plot_curves, plot_heatmaps
from prune.report.render import Block, render_html, render_markdown
from prune.report.run_files import RunFiles
from prune.report.tables import curve_table, final_table, score_table, spearman_table, verdict

__all__ = ["RunFiles", "WrittenReport", "build_blocks", "final_table_text", "write_report"]


@dataclass
class WrittenReport:
    """Paths written (report.md, report.html, figures) and the final-model summary numbers."""

    files: list[Path]
    summary: dict[str, Any] = field(default_factory=dict)


def _order(found: dict[str, Any], recipe: dict[str, Any] | None) -> list[str]:
    wanted = list(((recipe or {}).get("score") or {}).get("criteria", {})) or list(found)
    return [c for c in wanted if c in found] + [c for c in found if c not in wanted]


def _reload_blocks(out: Path, run: RunFiles, recipe: dict[str, Any] | None) -> list[Block]:
    prune = run.prune
    if not prune:
        return []
    model_dir = (out / prune.model_dir).resolve()
    data = (recipe or {}).get("data", {}).get("name", "tweets")
    max_length = (recipe or {}).get("data", {}).get("max_length", 64)
    blocks: list[Block] = [
        ("h", 2, "Reload the pruned model"),
        ("p", "Command line — re-evaluate it, or export it again:"),
        (
            "code",
            "bash",
            f"headprune evaluate --model {model_dir} --data {data} --split {prune.split} --max-length {max_length}\n"
            f"headprune export --model {model_dir} --format onnx --out onnx/",
        ),
        (
            "p",
            "Python — `load_model` rebuilds the pruned architecture from `config.json` "
            "(`headprune_kept_heads`) and loads the weights:",
        ),
        (
            "code",
            "python",
            "from prune import load_model\n\n"
            f'model, tokenizer = load_model("{model_dir}")\n'
            'batch = tokenizer(["what a great day"], return_tensors="pt")\n'
            "probabilities = model(**batch).logits.softmax(-1)",
        ),
    ]
    onnx = run.export.models if run.export else {}
    if "pruned" in onnx:
        onnx_path = (out / onnx["pruned"].path).resolve()
        names = ", ".join(f'"{n}"' for n in onnx["pruned"].inputs)
        blocks += [
            ("p", "ONNX Runtime (dynamic batch and sequence axes; the tokenizer is saved beside the model):"),
            (
                "code",
                "python",
                "import onnxruntime as ort\nfrom transformers import AutoTokenizer\n\n"
                f'session = ort.InferenceSession("{onnx_path}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{onnx_path.parent}")\n'
                'batch = tokenizer(["what a great day"], return_tensors="np")\n'
                f'logits = session.run(["logits"], {{name: batch[name] for name in ({names})}})[0]',
            ),
        ]
    return blocks


def _repair_blocks(run: RunFiles) -> list[Block]:
    repair = run.repair
    if not repair:
        return []
    rows = [
        [
            str(layer.layer),
            str(len(layer.heads)),
            f"{layer.relative_before:.4f}" if layer.target_energy else "–",
            f"{layer.relative_after:.4f}" if layer.target_energy else "–",
            f"{min(layer.scales):.3f} … {max(layer.scales):.3f}",
        ]
        for layer in repair.layers
    ]
    return [
        ("h", 2, "Repair"),
        (
            "p",
            "Least-squares rescaling of the surviving heads of each pruned layer on "
            f"{repair.examples} calibration rows; relative reconstruction error of the attention output "
            "before → after:",
        ),
        ("table", ["layer", "heads kept", "error before", "error after", "scales"], rows),
    ]


def _run_blocks(
    run: RunFiles,
    command: str | None,
    timings: dict[str, Any] | None,
    environment: dict[str, Any] | None,
    recipe: dict[str, Any] | None,
) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Run")]
    if run.finetune:
        test = ((run.finetune.metrics or {}).get("test") or {}).get("accuracy")
        text = f"Model: fine-tuned classifier at `{run.finetune.path}`"
        if run.finetune.train_seconds is not None:
            text += f", trained once in {run.finetune.train_seconds:.0f} s (cached; a cold-cache run adds this time)"
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
    return blocks


def _score_seconds(timings: dict[str, Any] | None) -> dict[str, float]:
    """Each criterion's scoring time from the stage timings (``score-<criterion>``)."""
    out = {}
    for stage, value in (timings or {}).items():
        seconds = value[0] if isinstance(value, (tuple, list)) else value
        if stage.startswith("score-") and isinstance(seconds, (int, float)):
            out[stage[len("score-") :]] = float(seconds)
    return out


def build_blocks(
    out: Path,
    *,
    title: str,
    recipe: dict[str, Any] | None = None,
    command: str | None = None,
    timings: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    files: Collection[str] | None = None,
) -> tuple[list[Block], dict[str, Any]]:
    """The report as a list of blocks (rendered to Markdown and HTML) plus the summary numbers.

    ``files``: the run files of this run, relative to ``out`` (default: every run file present).
    """
    figures = out / "figures"
    run = RunFiles.read(out, files)
    prune, scores = run.prune, run.scores
    order = _order(scores, recipe)
    model = f"`{(recipe or {}).get('model', 'the model')}`"
    if (recipe or {}).get("finetune"):
        model = f"{model} fine-tuned on {recipe.get('data', {}).get('name', 'the data')}"
    blocks: list[Block] = [("h", 1, title), ("p", verdict(prune, run.cost, run.export, model))]

    headers, rows, summary = final_table(prune, run.dense, run.cost, run.export)
    if rows:
        blocks += [("h", 2, "Final model: dense vs pruned" if prune else "Dense model"), ("table", headers, rows)]
        notes = []
        if run.cost:
            notes.append(
                f"Latency: median of {run.cost.dense.latency_repeats} forward passes on {run.cost.dense.threads} "
                "CPU thread(s), dense and pruned interleaved; ONNX Runtime timed on the same batches."
            )
        if prune and prune.reload_max_abs_diff is not None:
            diff = prune.reload_max_abs_diff
            notes.append(
                "The saved checkpoint reloads to "
                + ("exactly the logits" if diff == 0 else f"logits within {diff:.1e}")
                + " of the in-memory pruned model."
            )
        if notes:
            blocks.append(("p", " ".join(notes)))
    blocks += _reload_blocks(out, run, recipe)

    if scores:
        removed = prune.decision.heads if prune else {}
        chosen = prune.decision.criterion if prune else None
        path = plot_heatmaps({n: scores[n] for n in order}, figures / "heatmaps.png", removed, chosen)
        blocks += [
            ("h", 2, "Head importance"),
            (
                "p",
                "Each panel is one criterion's score for every head (rows: layers, bottom = first; columns: heads; "
                "brighter = more important, each panel on its own scale). Crosses mark the heads the final model lost.",
            ),
            ("img", path, "head-importance heatmaps"),
            ("table", *score_table(scores, order, _score_seconds(timings))),
        ]
        if len(order) > 1:
            blocks += [
                ("p", "Rank agreement between criteria (Spearman correlation over all heads):"),
                ("table", *spearman_table(scores, order)),
            ]
    if run.sweep:
        sweep = run.sweep
        max_drop = (((recipe or {}).get("prune") or {}).get("target") or {}).get("max_drop")
        path = plot_curves(sweep, figures / "curves.png", prune, max_drop)
        blocks += [
            ("h", 2, "Pruning curves"),
            (
                "p",
                f"{sweep.metric.capitalize()} on {sweep.examples} {sweep.split} rows "
                "(disjoint from the scoring rows) "
                "after removing the lowest-ranked fraction of all heads, for each criterion; no repair.",
            ),
            ("img", path, "pruning curves"),
            ("table", *curve_table(sweep, max_drop)),
        ]
    blocks += _repair_blocks(run)
    compression, compression_summary = compression_blocks(run, figures)
    if compression and not scores and not prune:
        blocks[1] = ("p", f"Compression of {model}: heads and feed-forward neurons to a budget (below).")
    blocks += compression
    summary.update(compression_summary)
    if run.analysis:
        if not scores and not prune:
            blocks[1] = ("p", f"Interpretation of {model} (no head scoring or pruning requested).")
        blocks += [
            ("h", 2, "Analysis"),
            (
                "p",
                "Attribution trees (AttAttr §4) and mined trigger patterns with their attack (AttAttr §5) of the "
                "dense model: " + ", ".join(f"`{f}`" for f in run.analysis) + ".",
            ),
        ]
    blocks += _run_blocks(run, command, timings, environment, recipe)
    return blocks, summary


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    title: str = "headprune report",
    recipe: dict[str, Any] | None = None,
    command: str | None = None,
    timings: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    files: Collection[str] | None = None,
) -> WrittenReport:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir`` from its run files
    (only ``files``, relative to ``out_dir``, when given)."""
    out = Path(out_dir)
    if recipe is None and (out / "recipe.yaml").is_file():
        recipe = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    blocks, summary = build_blocks(
        out, title=title, recipe=recipe, command=command, timings=timings, environment=environment, files=files
    )
    for name, text in (("report.md", render_markdown(blocks, out)), ("report.html", render_html(blocks, title))):
        atomic_write_text(out / name, text)
    images = [Path(b[1]) for b in blocks if b[0] == "img"]
    return WrittenReport([out / "report.md", out / "report.html", *images], summary)


def final_table_text(out_dir: str | os.PathLike[str], files: Collection[str] | None = None) -> str:
    """The final-model table as plain text (what ``headprune run`` prints at the end)."""
    run = RunFiles.read(Path(out_dir), files)
    headers, rows, _ = final_table(run.prune, run.dense, run.cost, run.export)
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
