"""``headprune evaluate``: metrics of a (pruned) model on a labelled split.

Runs on one process, or sharded over several with results gathered (no example counted twice)::

    headprune evaluate --model pruned/ --data tweets --split test
    torchrun --nproc_per_node 2 -m prune.cli evaluate --model pruned/ --data tweets
    accelerate launch --multi_gpu --num_processes 2 -m prune.cli evaluate --model pruned/ --data tweets

(``--multi_gpu`` also works on a CPU-only machine: headprune then uses gloo on the CPU. Note that
``accelerate launch --num_processes 2 --cpu`` without a multi-CPU ``accelerate config`` starts a
single process.)
"""

from __future__ import annotations

import argparse

from prune.commands._data import add_data_arguments, data_spec
from prune.commands.checks import add_max_length_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the evaluation options."""
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a model directory (pruned by headprune or dense), 'default' (the embedded classifier, "
        "fine-tuned on first use), 'minilm' or a hub id",
    )
    add_data_arguments(parser)
    parser.add_argument("--split", default="test", help="split to evaluate on (default: %(default)s)")
    parser.add_argument(
        "--metrics",
        default="accuracy,macro_f1",
        help="comma-separated: accuracy, macro_f1, matthews_corrcoef (built-in), or any metric Hugging Face "
        "evaluate loads: a local metric script (my_metric.py, or a directory holding <dir name>.py) or a hub "
        "name such as precision (needs network) (default: %(default)s)",
    )
    parser.add_argument("--max-examples", type=int, default=None, help="only the first N rows of the split")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    add_max_length_argument(parser)
    parser.add_argument("--out", default=None, metavar="JSON", help="also save the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line per metric (on the main process only)."""
    from attribution.core import processes
    from attribution.core.errors import HeadpruneError
    from attribution.core.validate import check_output_file
    from prune.commands.checks import at_least, checked_data, checked_model, fitted_max_length
    from prune.evaluate import evaluate, evaluation_rows
    from prune.metrics import compute_metrics

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise HeadpruneError("--metrics names no metric")
    compute_metrics([0], [0], metrics)  # unknown names
    at_least(args, 1, "batch_size", "max_examples")
    if args.out:
        check_output_file(args.out)
    # the model is loaded once, and it and the data are checked before anything is written
    model, tokenizer = checked_model(args.model, max_length=args.max_length, progress=not args.quiet)
    args.max_length = fitted_max_length(model, args.max_length, 64)
    checked_data(data_spec(args), model, args.split)
    spec, rows = evaluation_rows(
        data_spec(args), split=args.split, max_examples=args.max_examples, max_length=args.max_length
    )
    result = evaluate(
        model,
        tokenizer,
        rows,
        metrics=metrics,
        batch_size=args.batch_size,
        max_length=spec.max_length,
        progress=not args.quiet,
        model_name=args.model,
        data_name=spec.name,
        split=args.split,
    )
    if processes.is_main_process():
        if args.out:
            result.save(args.out)
        spread = f" on {result.processes} processes" if result.processes > 1 else ""
        print(f"{args.model} on {result.data}/{result.split}: {result.examples} examples{spread}")
        for name, value in result.metrics.items():
            print(f"{name}: {value:.4f}")
    return 0
