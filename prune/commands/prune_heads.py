"""``headprune prune``: choose heads from a scores file, remove them (optionally repair), save.

Examples::

    headprune prune --model default --scores attattr.json --sparsity 0.5 --out pruned/
    headprune prune --model default --scores taylor.json --keep-per-layer 6 --repair --out pruned/
    headprune prune --model default --scores taylor.json --iterative --tolerance 0.01 --out pruned/

The output directory is a pruned checkpoint (load it with ``prune.load_model`` or
``headprune evaluate --model DIR``; with ``--remote-code`` also with transformers alone,
``from_pretrained(DIR, trust_remote_code=True)``) plus ``prune_report.json`` (``prune.workflow.PruneReport``): the
heads removed and, when measured, the metric of the dense, pruned and repaired model.
"""

from __future__ import annotations

import argparse

from prune.commands._data import add_data_arguments, data_spec
from prune.commands.checks import add_max_length_argument


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
        "scores file's criterion, while the metric stays within --tolerance of the dense model",
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
    add_data_arguments(parser, "data for --iterative, --repair and --evaluate")
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
    add_max_length_argument(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="where to save the pruned model")
    parser.add_argument(
        "--remote-code",
        action="store_true",
        help="also write modeling_headprune.py and an auto_map, so that transformers loads the checkpoint "
        "without headprune via from_pretrained(DIR, trust_remote_code=True); off by default, since loading "
        "it runs code from the directory",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Select, remove, optionally repair, save; print what happened."""
    from prune.workflow import prune_checkpoint

    _check(args)
    report = prune_checkpoint(
        args.model,
        args.scores,
        args.out,
        sparsity=args.sparsity,
        count=args.count,
        keep_per_layer=args.keep_per_layer,
        iterative=args.iterative,
        tolerance=args.tolerance,
        step=args.step,
        min_per_layer=args.min_per_layer,
        repair=args.repair,
        evaluate=args.evaluate,
        data=data_spec(args),
        metric=args.metric,
        eval_split=args.eval_split,
        eval_examples=args.eval_examples,
        score_examples=args.score_examples,
        calibration_examples=args.calibration_examples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=not args.quiet,
        remote_code=args.remote_code,
    )
    removed = report.heads_before - report.heads_after
    print(
        f"removed {removed} heads ({report.criterion} scores): {report.heads_after} of {report.heads_before} "
        f"remain -> {args.out}"
    )
    for layer, kept in enumerate(report.kept):
        print(f"  layer {layer}: keeps {len(kept)} heads {kept}")
    if report.iterative is not None:
        print(f"iterative: {len(report.iterative['history'])} rounds; stopped: {report.iterative['stopped_because']}")
    if report.repair is not None:
        from prune.repair import RepairResult

        print(RepairResult.from_dict(report.repair).summary())
    for name, values in report.metrics.items():
        print(f"{args.metric} ({name}, {args.eval_split}): {values.get(args.metric, float('nan')):.4f}")
    return 0


def _check(args: argparse.Namespace) -> None:
    """Every input, before anything is written: options, the output directory, the model, the
    scores file against the model's shape, the data's classes when a metric is measured."""
    from attribution.core.errors import HeadpruneError
    from attribution.core.validate import check_finite, check_output_dir
    from prune.commands.checks import at_least, checked_data, checked_model, checked_scores, fitted_max_length

    if args.sparsity is not None and not 0 < check_finite(args.sparsity, "--sparsity") < 1:
        raise HeadpruneError(f"--sparsity must be a fraction strictly between 0 and 1, got {args.sparsity}")
    if not 0 < check_finite(args.step, "--step") <= 1:
        raise HeadpruneError(f"--step must lie in (0, 1], got {args.step}")
    check_finite(args.tolerance, "--tolerance", minimum=0.0)
    at_least(args, 1, "count", "keep_per_layer", "eval_examples", "score_examples", "calibration_examples",
             "batch_size")
    at_least(args, 0, "min_per_layer")
    check_output_dir(args.out)
    model, _ = checked_model(args.model, max_length=args.max_length, tokenizer=False, progress=not args.quiet)
    args.max_length = fitted_max_length(model, args.max_length, 64)
    checked_scores(args.scores, model)
    if args.evaluate or args.iterative or args.repair:
        checked_data(data_spec(args), model, args.eval_split)
