"""``headprune triggers``: mine adversarial trigger patterns (AttAttr §5) and attack with them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attribution.core.errors import HeadpruneError
from prune.commands._data import add_data_arguments, data_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (MiniLM fine-tuned on tweets), 'minilm', a directory or a hub id "
                             "(default: %(default)s)")
    add_data_arguments(parser)
    parser.add_argument("--split", default="train", choices=("train", "validation", "test"),
                        help="split to mine from (the paper: train) (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=500,
                        help="examples to mine (seeded sample; only correctly classified ones are used) "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="AttAttr quadrature steps (default: %(default)s)")
    parser.add_argument("--method", default="riemann_right",
                        help="AttAttr quadrature (gausslegendre with 4 steps is accurate and fast) "
                             "(default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=2,
                        help="strongest token pairs of the top head per example (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples attributed together (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (default: %(default)s)")
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


def triggers_stage(
    model: Any,
    tokenizer: Any,
    splits: Any,
    out: str | Path,
    *,
    split: str = "train",
    examples: int | None = 500,
    attack: bool = False,
    attack_split: str = "validation",
    attack_examples: int | None = None,
    top_k: int = 5,
    random_trials: int = 3,
    patterns: str | Path | None = None,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
    **mine_options: Any,
) -> Any:
    """Mine (or load) patterns, optionally attack, save the ``TriggerReport`` to ``out``; returns it.

    ``splits``: a ``DatasetDict`` from ``attribution.core.data.load_splits``. ``mine_options`` go to
    ``mine_triggers`` (n_steps, method, pairs, batch_size, ...). Meant for the recipe runner too.
    """
    from attribution.core.data import label_names
    from attribution.triggers import TriggerReport, attack_triggers, mine_triggers

    names = label_names(splits)
    classes = int(model.config.num_labels)
    if classes != len(names):
        raise HeadpruneError(f"the model has {classes} classes but the data set has {len(names)}: {', '.join(names)}")
    if patterns is not None:
        report = TriggerReport.load(patterns)
        if report.label_names != names:
            raise HeadpruneError(f"{patterns} was mined for classes {report.label_names}, the data has {names}")
    else:
        report = mine_triggers(
            model, tokenizer, splits[split], examples=examples, max_length=max_length, seed=seed,
            label_names=names, progress=progress, **mine_options,
        )
        report.provenance["data_split"] = split
    if attack:
        report = attack_triggers(
            model, tokenizer, report, splits[attack_split], top_k=top_k, examples=attack_examples,
            random_trials=random_trials, max_length=max_length, seed=seed, progress=progress,
        )
        report.provenance["attack"]["split"] = attack_split
    report.save(out)
    return report


def run(args: argparse.Namespace) -> int:
    from attribution.core.data import load_splits
    from attribution.models import load_classifier
    from prune.finetune import resolve_model

    for name in ("examples", "steps", "pairs", "batch_size", "top_k", "random_trials"):
        if getattr(args, name) < 1:
            raise HeadpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.attack_examples is not None and args.attack_examples < 1:
        raise HeadpruneError(f"--attack-examples must be at least 1, got {args.attack_examples}")
    if not args.out.lower().endswith(".json"):
        raise HeadpruneError(f"--out must be a .json file, got {args.out}")
    splits = load_splits(data_spec(args))
    model, tokenizer = load_classifier(resolve_model(args.model, progress=not args.quiet))
    report = triggers_stage(
        model,
        tokenizer,
        splits,
        args.out,
        split=args.split,
        examples=args.examples,
        attack=args.attack,
        attack_split=args.attack_split,
        attack_examples=args.attack_examples,
        top_k=args.top_k,
        random_trials=args.random_trials,
        patterns=args.patterns,
        max_length=args.max_length,
        seed=args.seed,
        progress=not args.quiet,
        n_steps=args.steps,
        method=args.method,
        pairs=args.pairs,
        batch_size=args.batch_size,
    )
    report.provenance.setdefault("data", args.data)
    report.save(args.out)
    if not args.quiet:
        print(report.summary(k=args.top_k))
    print(f"wrote {args.out}")
    return 0
