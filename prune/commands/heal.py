"""``headprune heal``: distil the dense model into a pruned one under a wall-clock budget."""

from __future__ import annotations

import argparse

from prune.commands._data import add_data_arguments, data_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="the pruned model to heal (a directory)")
    parser.add_argument(
        "--teacher", default="default", help="the dense model it was pruned from (default: %(default)s)"
    )
    add_data_arguments(parser, "training and validation rows")
    parser.add_argument("--budget", default="10m", help="wall-clock budget: 10m, 90s, 1h30m (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (deterministic)")
    parser.add_argument("--train-examples", type=int, default=12000, help="training rows (default: %(default)s)")
    parser.add_argument("--held-out-examples", type=int, default=500,
                        help="validation rows for early stopping (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to save the healed model")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from prune.workflow import heal_checkpoint

    result = heal_checkpoint(
        args.model, args.out, teacher=args.teacher, data=data_spec(args), budget=args.budget, max_steps=args.max_steps,
        train_examples=args.train_examples, held_out_examples=args.held_out_examples, max_length=args.max_length,
        seed=args.seed, progress=not args.quiet,
    )
    print(result.summary())
    print(f"saved -> {args.out}")
    return 0
