"""``headprune faithfulness``: deletion benchmark of token-relevance methods on a data set."""

from __future__ import annotations

import argparse

from prune.commands._data import add_data_arguments, data_spec
from prune.commands.checks import add_max_length_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded MiniLM tweets classifier, fine-tuned on first use), 'minilm', "
        "a model directory (pruned ones too) or a hub id (default: %(default)s)",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--split", default="test", choices=["train", "validation", "test"], help="(default: %(default)s)"
    )
    parser.add_argument(
        "--examples", type=int, default=500, help="first N examples of the split (default: %(default)s)"
    )
    parser.add_argument(
        "--methods",
        default="all",
        help="'all' or a comma list of: attention, rollout, gae, grad_attention, tokentm, attattr, ig, random "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--attattr-n-steps", type=int, default=4, help="attattr: Gauss-Legendre nodes (default: %(default)s)"
    )
    parser.add_argument("--ig-n-steps", type=int, default=20, help="ig: Gauss-Legendre nodes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random: seed (default: %(default)s)")
    parser.add_argument(
        "--fractions",
        default=None,
        help="comma list of deletion fractions (default: 0,0.1,...,0.9)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="examples explained at once (default: %(default)s)")
    parser.add_argument(
        "--forward-batch-size", type=int, default=512, help="perturbed inputs per forward call (default: %(default)s)"
    )
    add_max_length_argument(parser)
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="writes faithfulness.json, faithfulness.md, faithfulness.png"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from attribution.core.data import iter_batches, load_splits
    from attribution.core.validate import check_output_dir, check_seed
    from attribution.faithfulness import DEFAULT_FRACTIONS, faithfulness
    from attribution.relevance import default_method_options, parse_methods, special_token_ids
    from prune.commands.checks import at_least, checked_model, fitted_max_length, parse_fractions

    at_least(args, 1, "examples", "batch_size", "forward_batch_size", "attattr_n_steps", "ig_n_steps")
    check_seed(args.seed, "--seed")
    methods = parse_methods(args.methods)
    fractions = parse_fractions(args.fractions, "--fractions") if args.fractions else DEFAULT_FRACTIONS
    out = check_output_dir(args.out)
    model, tokenizer = checked_model(args.model, max_length=args.max_length, progress=not args.quiet)
    args.max_length = fitted_max_length(model, args.max_length, 64)
    split = load_splits(data_spec(args))[args.split]
    split = split.select(range(min(args.examples, len(split))))
    batches = iter_batches(
        split, tokenizer, batch_size=args.batch_size, max_length=args.max_length, sort_by_length=True
    )
    options = default_method_options(
        tokenizer,
        {
            "attattr": {"n_steps": args.attattr_n_steps},
            "ig": {"n_steps": args.ig_n_steps},
            "random": {"seed": args.seed},
        },
    )
    result = faithfulness(
        model,
        batches,
        methods,
        keep_ids=special_token_ids(tokenizer),
        pad_id=tokenizer.pad_token_id,
        fractions=fractions,
        forward_batch_size=args.forward_batch_size,
        method_options={name: options.get(name, {}) for name in methods},
        progress=not args.quiet,
        total=len(split),
    )
    result.provenance.update({"model": args.model, "data": args.data, "split": args.split})
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "faithfulness.json")
    from attribution.core.io import atomic_write_text

    atomic_write_text(out / "faithfulness.md", result.summary() + "\n")
    result.plot(out / "faithfulness.png")
    print(result.summary())
    print(f"\n{result.provenance['forward_calls']} forward calls, {result.provenance['seconds']:.0f} s -> {out}")
    return 0
