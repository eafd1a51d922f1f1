"""``headprune prune``: choose heads from a scores file, remove them (optionally repair), save.

Examples::

    headprune prune --model default --scores attattr.json --sparsity 0.5 --out pruned/
    headprune prune --model default --scores taylor.json --keep-per-layer 6 --repair --out pruned/
    headprune prune --model default --scores taylor.json --iterative --tolerance 0.01 --out pruned/

The output directory is a ``save_pruned`` checkpoint (load it with ``prune.load_pruned`` or
``headprune evaluate --model DIR``) plus ``prune_report.json``: the heads removed and, when
measured, the metric of the dense, pruned and repaired model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_NAME = "prune_report.json"


@dataclass
class PruneReport:
    """What ``headprune prune`` did; saved as ``prune_report.json`` next to the pruned weights."""

    model: str
    scores: str
    method: str
    strategy: dict[str, Any]
    removed: dict[int, list[int]]
    kept: list[list[int]]
    heads_before: int
    heads_after: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    repair: dict[str, Any] | None = None
    iterative: dict[str, Any] | None = None
    seconds: float = 0.0

    def save(self, path: str | os.PathLike[str]) -> Path:
        from attribution.core.io import atomic_write_text

        atomic_write_text(path, json.dumps({"format": "headprune.PruneReport", **asdict(self)}, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruneReport:
        from attribution.core.errors import HeadpruneError

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HeadpruneError(f"prune report not found: {path}") from None
        if data.pop("format", None) != "headprune.PruneReport":
            raise HeadpruneError(f"{path} is not a headprune prune report")
        data["removed"] = {int(k): v for k, v in data["removed"].items()}
        return cls(**data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the pruning options."""
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded MiniLM tweets classifier), or a model directory, pruned or not "
        "(default: %(default)s)",
    )
    parser.add_argument("--scores", required=True, metavar="JSON", help="HeadScores file (headprune attribute)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, help="fraction of all heads to have removed, in (0, 1)")
    how.add_argument("--count", type=int, help="number of heads to remove")
    how.add_argument("--keep-per-layer", type=int, metavar="K", help="keep the K best heads of every layer")
    how.add_argument(
        "--iterative",
        action="store_true",
        help="Michel et al.: remove --step of the heads at a time, re-scoring the masked model with the "
        "scores file's method, while the metric stays within --tolerance of the dense model",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="--iterative: stop when the metric falls below dense * (1 - tolerance) (default: %(default)s)",
    )
    parser.add_argument(
        "--step", type=float, default=0.1, help="--iterative: fraction of all heads per round (default: %(default)s)"
    )
    parser.add_argument("--min-per-layer", type=int, default=0, metavar="K", help="never keep fewer heads in a layer")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="least-squares rescaling of the surviving heads on calibration data (Kwon et al.)",
    )
    parser.add_argument(
        "--data",
        default="tweets",
        help="data for --iterative, --repair and --evaluate: 'tweets', a hub name or a local file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="also measure the metric of the dense and the pruned model"
    )
    parser.add_argument(
        "--metric", default="accuracy", help="metric for --iterative and reports (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-split", default="validation", help="split the metric is measured on (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-examples", type=int, default=1000, help="rows of --eval-split to measure on (default: %(default)s)"
    )
    parser.add_argument(
        "--score-examples",
        type=int,
        default=200,
        help="--iterative: validation rows the heads are re-scored on each round (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration-examples",
        type=int,
        default=256,
        help="--repair: training rows used as calibration data (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to save the pruned model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _positive(name: str, value: int) -> None:
    from attribution.core.errors import HeadpruneError

    if value < 1:
        raise HeadpruneError(f"{name} must be a positive integer, got {value}")


def run(args: argparse.Namespace) -> int:
    """Select, mask, optionally repair, save; print what happened."""
    from attribution import instrument
    from attribution.core.data import DataSpec, iter_batches, load_splits
    from attribution.core.errors import HeadpruneError
    from attribution.importance import head_importance
    from attribution.scores import HeadScores
    from prune.evaluate import evaluate, load_model
    from prune.masking import count_heads, mask_heads
    from prune.metrics import compute_metrics
    from prune.repair import repair
    from prune.strategies import check_scores, iterative_pruning, select_heads
    from prune.surgery import save_pruned

    started = time.perf_counter()
    for name in ("eval_examples", "score_examples", "calibration_examples", "batch_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    compute_metrics([0], [0], [args.metric])  # an unknown metric fails before any work
    progress = not args.quiet
    scores = HeadScores.load(args.scores)
    model, tokenizer = load_model(args.model)
    check_scores(scores, model)
    kept_before = instrument.kept_heads(model)

    needs_data = args.iterative or args.repair or args.evaluate
    splits = load_splits(DataSpec(name=args.data, max_length=args.max_length)) if needs_data else None
    eval_set = None
    if splits is not None:
        if args.eval_split not in splits:
            raise HeadpruneError(f"no split {args.eval_split!r} in {args.data}")
        eval_set = splits[args.eval_split].select(range(min(args.eval_examples, len(splits[args.eval_split]))))

    def metric_of(m: Any) -> float:
        result = evaluate(m, tokenizer, eval_set, metrics=[args.metric], batch_size=64, max_length=args.max_length)
        return result.metrics[args.metric]

    metrics: dict[str, dict[str, float]] = {}
    iterative = None
    if args.iterative:
        score_set = splits["validation"].select(range(min(args.score_examples, len(splits["validation"]))))
        options = dict(scores.provenance.get("options", {}))

        def score_fn(m: Any) -> HeadScores:
            batches = (
                {k: v for k, v in b.items() if k != "index"}
                for b in iter_batches(score_set, tokenizer, batch_size=16, max_length=args.max_length)
            )
            return head_importance(m, batches, scores.method, progress=False, **options)

        result = iterative_pruning(
            model,
            score_fn,
            metric_of,
            step=args.step,
            tolerance=args.tolerance,
            min_per_layer=args.min_per_layer,
            progress=progress,
        )
        heads = result.heads
        iterative = result.to_dict()
        metrics["dense"] = {args.metric: result.dense_metric}
        strategy: dict[str, Any] = {"iterative": True, "tolerance": args.tolerance, "step": args.step}
        if not heads:
            raise HeadpruneError(
                f"no head could be removed within tolerance {args.tolerance} ({result.stopped_because})"
            )
    else:
        heads = select_heads(
            scores,
            sparsity=args.sparsity,
            count=args.count,
            keep_per_layer=args.keep_per_layer,
            min_per_layer=args.min_per_layer,
            present=kept_before,
        )
        chosen = {"sparsity": args.sparsity, "count": args.count, "keep_per_layer": args.keep_per_layer}
        strategy = {k: v for k, v in chosen.items() if v is not None}
    strategy["min_per_layer"] = args.min_per_layer
    if args.evaluate and "dense" not in metrics:
        metrics["dense"] = {args.metric: metric_of(model)}

    mask_heads(model, heads)
    repair_result = None
    if args.repair:
        train = splits["train"]
        calibration = train.select(range(min(args.calibration_examples, len(train))))
        batches = [
            {k: v for k, v in b.items() if k not in ("index", "labels")}
            for b in iter_batches(calibration, tokenizer, batch_size=args.batch_size, max_length=args.max_length)
        ]
        repair_result = repair(
            model, batches, metric_fn=lambda m: {args.metric: metric_of(m)}, progress=progress
        )
        metrics["pruned"] = repair_result.metric_before or {}
        metrics["repaired"] = repair_result.metric_after or {}
    elif args.evaluate or args.iterative:
        metrics["pruned"] = {args.metric: metric_of(model)}

    out = save_pruned(model, args.out, tokenizer)
    removed_now = {layer: sorted(h) for layer, h in heads.items()}
    report = PruneReport(
        model=args.model,
        scores=str(args.scores),
        method=scores.method,
        strategy=strategy,
        removed=removed_now,
        kept=[[h for h in kept if h not in removed_now.get(layer, [])] for layer, kept in enumerate(kept_before)],
        heads_before=sum(len(k) for k in kept_before),
        heads_after=sum(len(k) for k in kept_before) - count_heads(removed_now),
        metrics=metrics,
        repair=repair_result.to_dict() if repair_result else None,
        iterative=iterative,
        seconds=round(time.perf_counter() - started, 2),
    )
    report.save(out / REPORT_NAME)
    total = len(kept_before) * instrument.original_num_heads(model)
    print(
        f"removed {count_heads(removed_now)} heads ({scores.method} scores): {report.heads_after} of {total} "
        f"remain -> {out}"
    )
    for layer, kept in enumerate(report.kept):
        print(f"  layer {layer}: keeps {len(kept)} heads {kept}")
    if iterative is not None:
        print(f"iterative: {len(iterative['history'])} rounds; stopped: {iterative['stopped_because']}")
    if repair_result is not None:
        print(repair_result.summary())
    for name, values in metrics.items():
        value = values.get(args.metric, float("nan"))
        print(f"{args.metric} ({name}, {args.eval_split}, {len(eval_set)} examples): {value:.4f}")
    return 0
