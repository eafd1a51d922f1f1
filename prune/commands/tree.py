"""``headprune tree``: the attribution tree of one input (AttAttr §4), as text, PNG, SVG, HTML or JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (MiniLM fine-tuned on tweets), 'minilm', a directory or a hub id "
                             "(default: %(default)s)")
    parser.add_argument("--text", required=True, help="the input to explain")
    parser.add_argument("--text-pair", default=None, help="second text, for sentence-pair models")
    parser.add_argument("--steps", type=int, default=20,
                        help="AttAttr quadrature steps (the paper: 20; default: %(default)s)")
    parser.add_argument("--method", default="riemann_right",
                        help="quadrature: riemann_right (the paper), riemann_left, riemann_middle, riemann_trapezoid "
                             "or gausslegendre (far more exact for the same steps) (default: %(default)s)")
    parser.add_argument("--tau", type=float, default=0.4,
                        help="keep edges whose layer-scaled attribution is above this (default: %(default)s)")
    parser.add_argument("--target", default=None,
                        help="class to explain, by name or index (default: the predicted class)")
    parser.add_argument("--tokens", action="store_true",
                        help="one node per WordPiece token instead of per word (pieces merged by default)")
    parser.add_argument("--special-tokens", choices=("keep", "drop"), default="keep",
                        help="keep [SEP]/[CLS] as possible children (the paper) or leave them out entirely "
                             "(default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="truncate to this many tokens (default: %(default)s)")
    parser.add_argument("--out", action="append", default=None, metavar="FILE",
                        help="write the tree to FILE: .png .pdf .svg .html .txt or .json (repeatable); "
                             "the text form is always printed")
    parser.add_argument("--quiet", action="store_true", help="print only the paths written")


def parse_target(target: str | None, model: Any) -> int | None:
    """A class index from a name or an index (``None`` stays ``None``: the predicted class)."""
    if target is None:
        return None
    names = {str(v): int(k) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if target in names:
        return names[target]
    classes = int(model.config.num_labels)
    try:
        index = int(target)
    except ValueError:
        raise HeadpruneError(f"unknown class {target!r}; classes: {', '.join(names) or classes}") from None
    if not 0 <= index < classes:
        raise HeadpruneError(f"class index {index} outside 0..{classes - 1}")
    return index


def tree_stage(
    model: Any,
    tokenizer: Any,
    text: str,
    outputs: list[str | Path],
    *,
    text_pair: str | None = None,
    **options: Any,
) -> Any:
    """Build one tree and write it to every path in ``outputs`` (format by suffix); returns it.

    ``options`` go to ``attribution.tree.attribution_tree`` (tau, n_steps, method, target, ...).
    Meant for the recipe runner as well as this command.
    """
    from attribution.tree import attribution_tree
    from attribution.tree_render import FORMATS, save_tree

    for out in outputs:
        if Path(out).suffix.lower() not in FORMATS:
            raise HeadpruneError(f"unsupported tree output {Path(out).name!r}: use one of {', '.join(FORMATS)}")
    tree = attribution_tree(model, tokenizer, text, text_pair, **options)
    for out in outputs:
        save_tree(tree, out)
    return tree


def run(args: argparse.Namespace) -> int:
    from attribution.models import load_classifier
    from prune.finetune import resolve_model

    if args.steps < 1:
        raise HeadpruneError(f"--steps must be at least 1, got {args.steps}")
    if not 0.0 <= args.tau <= 1.0:
        raise HeadpruneError(f"--tau must lie in [0, 1], got {args.tau}")
    if args.max_length < 3:
        raise HeadpruneError(f"--max-length must be at least 3, got {args.max_length}")
    outputs = list(args.out or [])
    from attribution.tree_render import FORMATS

    for out in outputs:  # before the (slow) model load
        if Path(out).suffix.lower() not in FORMATS:
            raise HeadpruneError(f"unsupported tree output {Path(out).name!r}: use one of {', '.join(FORMATS)}")
    model, tokenizer = load_classifier(resolve_model(args.model, progress=not args.quiet))
    tree = tree_stage(
        model,
        tokenizer,
        args.text,
        outputs,
        text_pair=args.text_pair,
        tau=args.tau,
        n_steps=args.steps,
        method=args.method,
        target=parse_target(args.target, model),
        word_level=not args.tokens,
        special_tokens=args.special_tokens,
        max_length=args.max_length,
    )
    if not args.quiet:
        print(tree.to_text())
    for out in outputs:
        print(f"wrote {out}")
    return 0
