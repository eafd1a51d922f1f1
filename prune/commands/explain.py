"""``headprune explain``: token relevance of one input by several methods, as an HTML page (+ PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the embedded MiniLM tweets classifier, fine-tuned on first use), 'minilm', "
        "a model directory (pruned ones too) or a hub id (default: %(default)s)",
    )
    parser.add_argument("--text", required=True, help="the text to explain")
    parser.add_argument("--text-pair", default=None, help="second text, for sentence-pair models")
    parser.add_argument(
        "--methods",
        default="all",
        help="'all' or a comma list of: attention, rollout, gae, grad_attention, tokentm, attattr, ig, random "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--target", default=None, help="class to explain, by name or index (default: the predicted class)"
    )
    parser.add_argument(
        "--n-steps", type=int, default=None, help="quadrature nodes for attattr (default 4) and ig (default 20)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random: seed (default: %(default)s)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens after truncation (default: 128, or the model's limit if lower)",
    )
    parser.add_argument("--out", default="explain.html", metavar="HTML", help="the page (default: %(default)s)")
    parser.add_argument(
        "--png", default=None, metavar="PNG", help="the picture (default: the page's name with .png)"
    )
    parser.add_argument("--json", default=None, metavar="JSON", help="also save the word relevances as JSON")


def method_options(args: argparse.Namespace) -> dict[str, dict]:
    options: dict[str, dict] = {"random": {"seed": args.seed}}
    if args.n_steps is not None:
        if args.n_steps < 1:
            from attribution.core.errors import HeadpruneError

            raise HeadpruneError(f"--n-steps must be at least 1, got {args.n_steps}")
        options["attattr"] = {"n_steps": args.n_steps}
        options["ig"] = {"n_steps": args.n_steps}
    return options


def run(args: argparse.Namespace) -> int:
    from attribution.core.validate import check_output_file, check_seed
    from attribution.explain_html import explain_text
    from attribution.relevance import parse_methods
    from prune.commands.checks import checked_model, fitted_max_length

    methods = parse_methods(args.methods)  # fail on a typo before loading anything
    check_seed(args.seed, "--seed")
    options = method_options(args)
    for path, name in ((args.out, "--out"), (args.png or Path(args.out).with_suffix(".png"), "--png"),
                       (args.json, "--json")):
        if path is not None:
            check_output_file(path, name)
    model, tokenizer = checked_model(args.model, max_length=args.max_length)
    args.max_length = fitted_max_length(model, args.max_length, 128)
    explanation = explain_text(
        model,
        tokenizer,
        args.text,
        args.text_pair,
        methods,
        target=args.target,
        max_length=args.max_length,
        method_options=options,
    )
    explanation.provenance["model"] = args.model
    html_path = explanation.save_html(args.out)
    png_path = explanation.save_png(args.png or Path(args.out).with_suffix(".png"))
    if args.json:
        explanation.save(args.json)
    print(f"class explained: {explanation.target_name} (p = {explanation.probability:.3f})")
    for name, values in explanation.relevance.items():
        order = sorted(range(len(values)), key=lambda i: -values[i])[:3]
        top = ", ".join(explanation.words[i] for i in order)
        print(f"  {name:<15} {explanation.seconds[name]:7.3f} s   top words: {top}")
    print(f"wrote {html_path} and {png_path}")
    return 0
