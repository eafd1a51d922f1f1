#!/usr/bin/env python
"""Dense vs 50%-heads-removed MiniLM-L6 tweets classifier: does pruning pay?

Removes (physically) the globally lowest-scored half of the heads, then measures both models side
by side in one run — latency at batch sizes 1 and 32 (median of --repeats interleaved forward
passes on fixed test-set batches), parameters, attention and total FLOPs at the test set's mean
token length, file size and test accuracy — and prints the FLOP-predicted speedup beside the
measured one. Not a timed test: run it by hand on a quiet machine.

    python scripts/bench_prune.py --scores results/sweep/scores_attattr.json --out results/bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# Run from a checkout: make the repository importable as regular packages whatever the cwd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.core.data import iter_batches, load_splits
from attribution.core.io import atomic_write_text
from attribution.criteria import head_importance
from attribution.scores import HeadScores
from prune.checkpoints import load_model
from prune.cost import (
    compare_costs,
    cost_report,
    format_comparison,
    latency_batches,
    mean_token_length,
    measure_latency,
)
from prune.evaluate import evaluate
from prune.finetune import FINETUNE_META, default_finetuned_path
from prune.strategies import check_scores, select_global
from prune.workflow import pruned_copy


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--scores", default=None, help="HeadScores JSON (default: taylor on 200 validation tweets)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the test-set accuracy")
    parser.add_argument("--out", default=None, help="directory for the cost reports (JSON)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "default" and not (default_finetuned_path() / FINETUNE_META).is_file():
        print(f"the default classifier is not trained yet ({default_finetuned_path()}); run headprune finetune")
        return 1
    dense, tokenizer = load_model(args.model)
    splits = load_splits("tweets")
    test = splits["test"]
    if args.scores:
        scores = HeadScores.load(args.scores)
    else:
        validation = splits["validation"].select(range(200))
        batches = ({k: v for k, v in b.items() if k != "index"} for b in iter_batches(validation, tokenizer))
        scores = head_importance(dense, batches, "taylor", total=200)
    check_scores(scores, dense)
    heads = select_global(scores, sparsity=args.sparsity)
    pruned = pruned_copy(dense, heads)
    print(f"removed {sum(len(v) for v in heads.values())} heads ({scores.criterion} ranking); "
          f"heads per layer: {[len(k) for k in pruned.config.headprune_kept_heads]}")

    length = mean_token_length(test, tokenizer)
    batches = latency_batches(test, tokenizer, sizes=(1, 32))
    shapes = {size: tuple(b["input_ids"].shape) for size, b in batches.items()}
    print(f"mean test length {length:.1f} tokens; timing batches {shapes}; {torch.get_num_threads()} threads")
    latency = measure_latency({"dense": dense, "pruned": pruned}, batches, repeats=args.repeats, warmup=args.warmup)
    reports = {
        name: cost_report(model, length, name=name, latency_ms=latency[name], repeats=args.repeats)
        for name, model in (("dense", dense), ("pruned", pruned))
    }
    if not args.no_accuracy:
        for name, model in (("dense", dense), ("pruned", pruned)):
            reports[name].extra["test"] = evaluate(model, tokenizer, test, metrics=("accuracy", "macro_f1")).metrics
    reports["dense"].extra["batch_shapes"] = {str(k): list(v) for k, v in shapes.items()}
    print(format_comparison(reports["dense"], reports["pruned"]))
    ratios = compare_costs(reports["dense"], reports["pruned"])
    for size, measured in ratios["measured_speedup"].items():
        print(f"batch {size}: predicted {ratios['predicted_speedup']:.2f}x (FLOPs), measured {measured:.2f}x")
    if not args.no_accuracy:
        print(f"test accuracy: dense {reports['dense'].extra['test']['accuracy']:.4f}, "
              f"pruned {reports['pruned'].extra['test']['accuracy']:.4f}")
    if args.out:
        out = Path(args.out)
        for name, report in reports.items():
            report.save(out / f"cost_{name}.json")
        atomic_write_text(out / "comparison.json", json.dumps(ratios, indent=1))
        print(f"saved -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
