#!/usr/bin/env python
"""Accuracy of the fine-tuned default classifier as heads are pruned, per ranking method.

For each head ranking (attattr, taylor, attention, random) scored on the first 200 validation
tweets, remove the globally lowest 10%, 20%, ..., 90% of the heads (no repair) and measure accuracy
and macro-F1 on the 2,000 test tweets; then, at 50%, the same with least-squares repair
(calibration: 256 training tweets). Scores and results are cached in --out, so a rerun only
computes what is missing. One process, one measurement at a time (the machine is shared).

    python scripts/sweep_prune.py --out results/sweep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Run from a checkout: make the repository importable as regular packages whatever the cwd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.core.data import iter_batches, load_splits
from attribution.core.io import atomic_write_text
from attribution.criteria import head_importance
from attribution.scores import HeadScores
from prune.checkpoints import load_model
from prune.evaluate import evaluate
from prune.finetune import FINETUNE_META, default_finetuned_path
from prune.strategies import select_global
from prune.workflow import prune_and_repair

METHODS = {
    "attattr": {"n_steps": 4, "integration": "gausslegendre"},  # GL-4: ~0.03% completeness error (DESIGN §3)
    "taylor": {},
    "attention": {},
    "random": {"seed": 0},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="results/sweep", help="directory for scores, results and the plot")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--score-examples", type=int, default=200)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--calibration-examples", type=int, default=256)
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    parser.add_argument("--repair-at", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "default" and not (default_finetuned_path() / FINETUNE_META).is_file():
        print(f"the default classifier is not trained yet ({default_finetuned_path()}); run headprune finetune")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "sweep.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("rows", [])
    done = {(r["method"], r["sparsity"], r["repair"]) for r in results["rows"]}

    def save() -> None:
        atomic_write_text(results_path, json.dumps(results, indent=1))

    model, tokenizer = load_model(args.model)
    splits = load_splits("tweets")
    validation = splits["validation"].select(range(args.score_examples))
    test = splits["test"].select(range(min(args.test_examples, len(splits["test"]))))
    calibration = splits["train"].select(range(args.calibration_examples))
    results.update(
        {
            "model": args.model,
            "score_examples": len(validation),
            "test_examples": len(test),
            "calibration_examples": len(calibration),
            "methods": {m: METHODS.get(m, {}) for m in args.methods.split(",")},
            "threads": torch.get_num_threads(),
        }
    )

    def metrics_of(m) -> dict[str, float]:
        return evaluate(m, tokenizer, test, metrics=("accuracy", "macro_f1"), batch_size=64).metrics

    calibration_batches = [
        {k: v for k, v in b.items() if k not in ("index", "labels")}
        for b in iter_batches(calibration, tokenizer, batch_size=32)
    ]
    if "dense" not in results:
        started = time.perf_counter()
        results["dense"] = metrics_of(model)
        results["dense_seconds"] = round(time.perf_counter() - started, 1)
        save()
    print(f"dense: {results['dense']}", flush=True)

    sparsities = [float(s) for s in args.sparsities.split(",")]
    for method in args.methods.split(","):
        scores_path = out / f"scores_{method}.json"
        if scores_path.is_file():
            scores = HeadScores.load(scores_path)
        else:
            batches = (
                {k: v for k, v in b.items() if k != "index"}
                for b in iter_batches(validation, tokenizer, batch_size=16, sort_by_length=True)
            )
            scores = head_importance(model, batches, method, total=len(validation), **METHODS.get(method, {}))
            scores.provenance.update({"model": args.model, "data": "tweets", "split": "validation"})
            scores.save(scores_path)
        print(f"{method}: scored in {scores.provenance.get('seconds')} s", flush=True)
        for sparsity in sparsities:
            for with_repair in ([False, True] if abs(sparsity - args.repair_at) < 1e-9 else [False]):
                if (method, sparsity, with_repair) in done:
                    continue
                started = time.perf_counter()
                heads = select_global(scores, sparsity=sparsity)
                row = {"method": method, "sparsity": sparsity, "repair": with_repair,
                       "heads_pruned": sum(len(v) for v in heads.values())}
                outcome = prune_and_repair(  # heads removed from a copy; repaired against the dense model
                    model, heads, evaluate=metrics_of, calibration=calibration_batches if with_repair else None
                )
                if outcome.repair is not None:
                    row["repair_relative_error"] = {
                        str(r.layer): [round(r.relative_before, 4), round(r.relative_after, 4)]
                        for r in outcome.repair.layers
                    }
                    row["repair_seconds"] = outcome.repair.seconds
                row.update(outcome.final_metrics)
                row["seconds"] = round(time.perf_counter() - started, 1)
                results["rows"].append(row)
                save()
                print(json.dumps(row), flush=True)

    write_table(results, out)
    plot(results, out / "sweep.png")
    print((out / "sweep.md").read_text())
    return 0


def write_table(results: dict, out: Path) -> None:
    rows = [r for r in results["rows"] if not r["repair"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sparsities = sorted({r["sparsity"] for r in rows})
    acc = {(r["method"], r["sparsity"]): r["accuracy"] for r in rows}
    lines = [
        f"Accuracy on {results['test_examples']} test tweets, heads removed (no repair); dense "
        f"{results['dense']['accuracy']:.4f}",
        "",
        "| heads pruned | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for s in sparsities:
        cells = [f"{acc[(m, s)]:.4f}" if (m, s) in acc else "" for m in methods]
        lines.append(f"| {round(s * 100)}% | " + " | ".join(cells) + " |")
    repaired = [r for r in results["rows"] if r["repair"]]
    if repaired:
        lines += ["", "At 50%: accuracy without / with repair", "", "| method | no repair | repair |", "|---|---|---|"]
        for r in repaired:
            lines.append(f"| {r['method']} | {acc.get((r['method'], r['sparsity']), float('nan')):.4f} | "
                         f"{r['accuracy']:.4f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    rows = [r for r in results["rows"] if not r["repair"]]
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["sparsity"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([100 * p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(results["dense"]["accuracy"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("heads pruned (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title("MiniLM-L6 tweets: accuracy vs heads pruned (removed, no repair)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
