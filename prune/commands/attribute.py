"""``headprune attribute``: score every attention head on a data set and save ``HeadScores``.

Examples::

    headprune attribute --criterion attattr --n-steps 3 --integration gaussradau --out attattr.json
    headprune attribute --criterion taylor --no-normalize --out taylor.json
    headprune attribute --criterion my_plugin --option alpha=0.5 --out mine.json

Every option of every registered criterion is a flag (``--n-steps``, ``--integration``,
``--target``, ``--normalize/--no-normalize``, ``--seed``, ...; unset = the criterion's default);
``--option KEY=VALUE`` reaches any criterion option, e.g. of criteria registered by plugins. Run
under ``torchrun --nproc_per_node N`` or ``accelerate launch`` to deal the examples out to several
processes in shards of ``--shard-size`` rows (the same scores, bit for bit, on any number of
processes); the main process writes the file and prints.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

from prune.commands._data import add_data_arguments, data_spec
from prune.commands.checks import add_max_length_argument

_DEST = "criterion_option__"  # argparse dest prefix of the criterion-option flags
# provenance entries every criterion has; the others are the criterion's diagnostics summary
_STANDARD = {
    "model", "model_type", "examples", "options", "kept_heads", "seconds", "headprune", "torch", "transformers",
    "processes", "data", "split", "shard_size",
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from attribution.criteria import CRITERIA

    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded MiniLM tweets classifier, fine-tuned on first use), 'minilm', "
        "a model directory (pruned ones too) or a hub id (default: %(default)s)",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--split",
        default="validation",
        choices=["train", "validation", "test"],
        help="held-out examples to score on (default: %(default)s)",
    )
    parser.add_argument(
        "--criterion",
        default="attattr",
        metavar="NAME",
        help=f"head-importance criterion: {', '.join(CRITERIA)} (default: %(default)s)",
    )
    parser.add_argument("--examples", type=int, default=200, help="examples to score on (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch (default: %(default)s)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=64,
        help="examples per shard; shards are dealt out to the processes of a launch (default: %(default)s)",
    )
    add_max_length_argument(parser)
    parser.add_argument("--out", required=True, metavar="JSON", help="where to write the HeadScores")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw the scores as a heatmap")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_criterion_arguments(parser)


def add_criterion_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option name of the registered criteria (a name several criteria share is one
    flag), unset by default, plus the repeatable ``--option KEY=VALUE``."""
    from attribution.criteria import CRITERIA

    group = parser.add_argument_group(
        "criterion options", "options of the chosen --criterion (unset: the criterion's own default)"
    )
    union: dict[str, list[tuple[str, Any]]] = {}
    for name, cls in CRITERIA.items():
        for option in cls.option_spec().values():
            union.setdefault(option.name, []).append((name, option))
    for key, owners in union.items():
        flag = "--" + key.replace("_", "-")
        if flag in parser._option_string_actions:  # e.g. a plugin's batch_size: only through --option
            continue
        help_text = "; ".join(_describe_option(names, option) for names, option in _group_by_help(owners))
        common = {"dest": _DEST + key, "default": None, "help": help_text.replace("%", "%%")}
        if all(option.type is bool for _, option in owners):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(flag, metavar=_metavar(owners), **common)
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any option of the chosen criterion (e.g. of a plugin's); repeatable",
    )


def _group_by_help(owners: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Criteria sharing an option with the same help and default: one entry ``"a, b"``."""
    grouped: dict[tuple[str, str], tuple[list[str], Any]] = {}
    for name, option in owners:
        grouped.setdefault((option.help, repr(option.default)), ([], option))[0].append(name)
    return [(", ".join(names), option) for names, option in grouped.values()]


def _describe_option(names: str, option: Any) -> str:
    choices = f"{', '.join(map(str, option.choices))}; " if option.choices else ""
    default = "" if option.default is None else f"default {option.default}"
    details = f"{choices}{default}".strip("; ")
    return f"{names}: {option.help or option.name}" + (f" ({details})" if details else "")


def _metavar(owners: list[tuple[str, Any]]) -> str:
    kinds = {option.type for _, option in owners}
    if len(kinds) == 1 and (kind := kinds.pop()) in (int, float):
        return "N" if kind is int else "X"
    return "VALUE"


def criterion_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``args.criterion`` given on the command line (flags and ``--option``), parsed
    by the criterion's own option types; a one-line error for options it does not take."""
    from attribution.core.errors import HeadpruneError
    from attribution.criteria import CRITERIA, make_criterion

    if args.criterion not in CRITERIA:
        make_criterion(args.criterion)  # the unknown-criterion error
    cls = CRITERIA[args.criterion]
    spec = cls.option_spec()
    given: dict[str, tuple[str, Any]] = {}  # key -> (how it was given, value)
    for dest, value in vars(args).items():
        if dest.startswith(_DEST) and value is not None:
            key = dest[len(_DEST) :]
            given[key] = ("--" + key.replace("_", "-"), value)
    for item in args.option:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise HeadpruneError(f"--option expects KEY=VALUE, got {item!r}")
        if key in given:
            raise HeadpruneError(f"criterion option {key} given twice ({given[key][0]} and --option {item})")
        given[key] = (f"--option {key}", text)
    for key, (how, _) in given.items():
        if key not in spec:
            renamed = cls.RENAMED.get(key)
            if renamed is not None:
                raise HeadpruneError(f"{how}: {args.criterion} option {key} was renamed to {renamed}")
            takes = ", ".join(spec) if spec else "none"
            raise HeadpruneError(f"{how}: criterion {args.criterion!r} takes no option {key}; its options: {takes}")
    return {key: spec[key].parse(args.criterion, value) for key, (_, value) in given.items()}


def run(args: argparse.Namespace) -> int:
    from attribution.core.validate import check_output_file, check_seed
    from attribution.criteria import make_criterion, score_in_shards
    from prune.commands.checks import at_least, checked_data, checked_model, fitted_max_length

    at_least(args, 1, "examples", "batch_size", "shard_size")
    options = criterion_options(args)
    if "seed" in options:
        check_seed(options["seed"], "--seed")
    criterion = make_criterion(args.criterion, **options)  # fails before any loading
    check_output_file(args.out)
    if args.plot:
        check_output_file(args.plot, "--plot")
    started = time.perf_counter()
    model, tokenizer = checked_model(args.model, max_length=args.max_length, progress=not args.quiet)
    args.max_length = fitted_max_length(model, args.max_length, 64)
    # fresh, aligned storage for weights loaded from safetensors (see prune.pipeline.context): CPU
    # kernels take the same code paths in every process, so the scores match bit for bit
    model = copy.deepcopy(model)
    split = checked_data(data_spec(args), model, args.split)[args.split]
    examples = min(args.examples, len(split))
    # Length-sorted batches inside each shard cut padding; the shards are merged in order.
    scores = score_in_shards(
        model,
        tokenizer,
        split,
        criterion,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_examples=args.examples,
        progress=not args.quiet,
    )
    if scores is None:
        return 0  # another process of the launch: the main one writes and prints
    scores.provenance.update({"model": args.model, "data": args.data, "split": args.split})
    scores.save(args.out)
    if args.plot:
        scores.plot(args.plot)
    seconds = time.perf_counter() - started
    print(
        f"scored {examples} {args.split} examples with {criterion.name} in {seconds:.1f} s "
        f"({scores.provenance['seconds'] / examples:.3f} s/example) -> {Path(args.out)}"
    )
    for key, value in scores.provenance.items():  # the criterion's diagnostics
        if key not in _STANDARD:
            shown = ", ".join(f"{k} {_number(v)}" for k, v in value.items()) if isinstance(value, dict) else value
            print(f"{key.replace('_', ' ')}: {shown}")
    print("top heads (layer, head):", ", ".join(f"L{layer}H{head}" for layer, head in scores.top(5)))
    return 0


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
