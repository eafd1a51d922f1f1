"""``headprune triggers``: mine adversarial trigger patterns (AttAttr §5) and attack with them."""

from __future__ import annotations

import argparse

from attribution.core.errors import HeadpruneError
from attribution.quadrature import INTEGRATIONS
from prune.commands._data import add_data_arguments, data_spec
from prune.commands.checks import add_max_length_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (MiniLM fine-tuned on tweets, on first use), 'minilm', a model directory "
                             "(pruned ones too) or a hub id "
                             "(default: %(default)s)")
    add_data_arguments(parser)
    parser.add_argument("--split", default="train", choices=("train", "validation", "test"),
                        help="split to mine from (the paper: train) (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=500,
                        help="examples to mine (seeded sample; only correctly classified ones are used) "
                             "(default: %(default)s)")
    parser.add_argument("--n-steps", type=int, default=20, help="AttAttr quadrature nodes (default: %(default)s)")
    parser.add_argument("--integration", default="riemann_right", choices=INTEGRATIONS,
                        help="AttAttr quadrature rule (gausslegendre with 4 nodes is accurate and fast) "
                             "(default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=2,
                        help="strongest token pairs of the top head per example (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples attributed together (default: %(default)s)")
    add_max_length_argument(parser)
    parser.add_argument("--patterns", default=None, metavar="FILE",
                        help="reuse patterns from a saved report instead of mining (e.g. to --attack later)")
    parser.add_argument("--attack", action="store_true",
                        help="insert each class's top patterns into held-out examples of the other classes")
    parser.add_argument("--top-k", type=int, default=5, help="patterns per class to attack with (default: %(default)s)")
    parser.add_argument("--attack-split", default="validation", choices=("train", "validation", "test"),
                        help="held-out split to attack (default: %(default)s)")
    parser.add_argument("--attack-examples", type=int, default=None,
                        help="attack a seeded sample of this many rows (default: the whole split)")
    parser.add_argument("--random-trials", type=int, default=3,
                        help="random-token baseline draws per pattern (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the samples and random tokens (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the report (JSON)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no summary")


def run(args: argparse.Namespace) -> int:
    from attribution.core.validate import check_output_file, check_seed
    from attribution.triggers import TriggerReport, run_triggers
    from prune.commands.checks import checked_data, checked_model, fitted_max_length

    for name in ("examples", "n_steps", "pairs", "batch_size", "top_k", "random_trials"):
        if getattr(args, name) < 1:
            raise HeadpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.attack_examples is not None and args.attack_examples < 1:
        raise HeadpruneError(f"--attack-examples must be at least 1, got {args.attack_examples}")
    if not args.out.lower().endswith(".json"):
        raise HeadpruneError(f"--out must be a .json file, got {args.out}")
    check_seed(args.seed, "--seed")
    check_output_file(args.out)
    if args.patterns is not None:
        TriggerReport.load(args.patterns)  # a bad file fails before the model loads
    model, tokenizer = checked_model(args.model, max_length=args.max_length, progress=not args.quiet)
    args.max_length = fitted_max_length(model, args.max_length, 64)
    splits = checked_data(data_spec(args), model)
    report = run_triggers(
        model,
        tokenizer,
        splits,
        None,  # saved below, with the data set named
        split=args.split,
        examples=args.examples,
        n_steps=args.n_steps,
        integration=args.integration,
        pairs=args.pairs,
        batch_size=args.batch_size,
        attack=args.attack,
        attack_split=args.attack_split,
        attack_examples=args.attack_examples,
        top_k=args.top_k,
        random_trials=args.random_trials,
        patterns=args.patterns,
        max_length=args.max_length,
        seed=args.seed,
        progress=not args.quiet,
    )
    report.provenance.setdefault("data", args.data)
    report.save(args.out)
    if not args.quiet:
        print(report.summary(k=args.top_k))
    print(f"wrote {args.out}")
    return 0
