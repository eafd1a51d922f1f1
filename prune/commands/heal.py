"""``headprune heal``: distil the dense model into a pruned one under a wall-clock budget."""

from __future__ import annotations

import argparse

from prune.commands._data import add_data_arguments, data_spec
from prune.commands.checks import add_max_length_argument


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
    add_max_length_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to save the healed model")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast precision (fp16 needs a GPU); default: what the launch says, else no")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=None, metavar="N",
                        help="split each process's share of a batch into N micro-batches (same batch size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from attribution.core import processes
    from attribution.core.validate import check_output_dir, check_seed
    from prune.commands.checks import at_least, checked_data, checked_model, fitted_max_length
    from prune.heal import parse_duration
    from prune.workflow import heal_checkpoint

    check_seed(args.seed, "--seed")
    parse_duration(args.budget)
    at_least(args, 1, "max_steps", "train_examples", "held_out_examples")
    check_output_dir(args.out)
    student, _ = checked_model(args.model, max_length=args.max_length, tokenizer=False, progress=not args.quiet)
    teacher, _ = checked_model(args.teacher, max_length=args.max_length, tokenizer=False, progress=not args.quiet)
    args.max_length = min(fitted_max_length(m, args.max_length, 64) for m in (student, teacher))
    checked_data(data_spec(args), teacher)
    if student.config.num_labels != teacher.config.num_labels:
        from attribution.core.errors import HeadpruneError

        raise HeadpruneError(
            f"--model has {student.config.num_labels} classes but --teacher {teacher.config.num_labels}"
        )
    del student, teacher
    result = heal_checkpoint(
        args.model, args.out, teacher=args.teacher, data=data_spec(args), budget=args.budget, max_steps=args.max_steps,
        train_examples=args.train_examples, held_out_examples=args.held_out_examples, max_length=args.max_length,
        seed=args.seed, progress=not args.quiet, mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    if processes.is_distributed() and not processes.is_main_process():
        return 0  # one report, from the main process
    print(result.summary())
    print(f"saved -> {args.out}")
    return 0
