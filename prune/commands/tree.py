"""``headprune tree``: the attribution tree of one input (AttAttr §4), as text, PNG, SVG, HTML or JSON."""

from __future__ import annotations

import argparse

from attribution.core.errors import HeadpruneError
from attribution.quadrature import INTEGRATIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (MiniLM fine-tuned on tweets, on first use), 'minilm', a model directory "
                             "(pruned ones too) or a hub id "
                             "(default: %(default)s)")
    parser.add_argument("--text", required=True, help="the input to explain")
    parser.add_argument("--text-pair", default=None, help="second text, for sentence-pair models")
    parser.add_argument("--n-steps", type=int, default=20,
                        help="AttAttr quadrature nodes (the paper: 20; default: %(default)s)")
    parser.add_argument("--integration", default="riemann_right", choices=INTEGRATIONS,
                        help="quadrature rule: riemann_right (the paper), riemann_left, riemann_middle, "
                             "riemann_trapezoid, gausslegendre (far more exact for the same steps) or gaussradau "
                             "(default: %(default)s)")
    parser.add_argument("--tau", type=float, default=0.4,
                        help="keep edges whose layer-scaled attribution is above this (default: %(default)s)")
    parser.add_argument("--target", default=None,
                        help="class to explain, by name or index (default: the predicted class)")
    parser.add_argument("--tokens", action="store_true",
                        help="one node per WordPiece token instead of per word (pieces merged by default)")
    parser.add_argument("--special-tokens", choices=("keep", "drop"), default="keep",
                        help="keep [SEP]/[CLS] as possible children (the paper) or leave them out entirely "
                             "(default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate to this many tokens (default: 128, or the model's limit if lower)")
    parser.add_argument("--out", action="append", default=None, metavar="FILE",
                        help="write the tree to FILE: .png .pdf .svg .html .txt or .json (repeatable); "
                             "the text form is always printed")
    parser.add_argument("--quiet", action="store_true", help="print only the paths written")


def run(args: argparse.Namespace) -> int:
    from attribution.core.validate import check_finite, check_output_file
    from attribution.tree_render import check_outputs, write_tree
    from prune.commands.checks import checked_model, fitted_max_length

    if args.n_steps < 1:
        raise HeadpruneError(f"--n-steps must be at least 1, got {args.n_steps}")
    if not 0.0 <= check_finite(args.tau, "--tau") <= 1.0:
        raise HeadpruneError(f"--tau must lie in [0, 1], got {args.tau}")
    if args.max_length is not None and args.max_length < 3:
        raise HeadpruneError(f"--max-length must be at least 3, got {args.max_length}")
    outputs = list(args.out or [])
    check_outputs(outputs)  # before the (slow) model load
    for out in outputs:
        check_output_file(out)
    model, tokenizer = checked_model(args.model, max_length=args.max_length, progress=not args.quiet)
    args.max_length = fitted_max_length(model, args.max_length, 128)
    tree = write_tree(
        model,
        tokenizer,
        args.text,
        outputs,
        text_pair=args.text_pair,
        tau=args.tau,
        n_steps=args.n_steps,
        integration=args.integration,
        target=args.target,
        word_level=not args.tokens,
        special_tokens=args.special_tokens,
        max_length=args.max_length,
    )
    if not args.quiet:
        print(tree.to_text())
    for out in outputs:
        print(f"wrote {out}")
    return 0
