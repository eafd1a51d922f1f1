"""What the commands check before they write anything: the model loads, the data's classes are the
model's, lengths fit the model, score files fit its shape, options are in range.

Every function raises a one-line ``HeadpruneError`` naming the option or file; the generic checks
(seeds, numbers, output paths, lengths, classes) live in ``attribution.core.validate``.
"""

from __future__ import annotations

import argparse
from typing import Any

from attribution.core.errors import HeadpruneError
from attribution.core.validate import check_classes, check_finite, check_max_length

__all__ = [
    "add_max_length_argument",
    "at_least",
    "checked_data",
    "checked_model",
    "checked_scores",
    "fitted_max_length",
    "parse_fractions",
]


def at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """``--name`` >= ``minimum`` for every attribute ``name`` of ``args`` that is set."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise HeadpruneError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def parse_fractions(text: str, name: str, *, low_open: bool = False) -> tuple[float, ...]:
    """A comma list of finite numbers in [0, 1) (``low_open``: (0, 1))."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise HeadpruneError(f"{name} must be comma-separated numbers, got {text!r}") from None
    for value in values:
        check_finite(value, name)
        if not (0 < value < 1 if low_open else 0 <= value < 1):
            raise HeadpruneError(f"{name}: {value} is outside {'(0, 1)' if low_open else '[0, 1)'}")
    return values


def add_max_length_argument(parser: argparse.ArgumentParser, default: int = 64) -> None:
    """``--max-length`` (unset: ``default``, lowered to the model's position limit; see ``fitted_max_length``)."""
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"tokens per example (default: {default}, or the model's limit if lower)",
    )


def checked_model(name: str, *, max_length: int | None = None, tokenizer: bool = True, progress: bool = True) -> Any:
    """``(model, tokenizer)`` from ``prune.checkpoints.load_model``, with ``--max-length`` checked
    against the model's position limit."""
    from prune.checkpoints import load_model

    model, tok = load_model(name, tokenizer=tokenizer, progress=progress)
    if max_length is not None:
        check_max_length(model, max_length)
    return model, tok


def fitted_max_length(model: Any, given: int | None, default: int) -> int:
    """``given`` (already checked), else ``default`` lowered to the model's position limit."""
    from attribution.core.validate import position_limit

    if given is not None:
        return given
    limit = position_limit(model.config)
    return default if limit is None else min(default, limit)


def checked_data(spec: Any, model: Any, split: str | None = None) -> Any:
    """The ``DatasetDict`` of ``spec`` (a ``DataSpec`` or name), its classes checked against ``model``'s
    (and ``split`` present)."""
    from attribution.core.data import as_spec, label_names, load_splits

    spec = as_spec(spec)
    splits = load_splits(spec)
    if split is not None and split not in splits:
        raise HeadpruneError(f"no split {split!r} in {spec.name}; choose one of {', '.join(splits)}")
    check_classes(model, label_names(splits), f"data set {spec.name}")
    return splits


def checked_scores(path: str, model: Any, name: str = "--scores") -> Any:
    """The ``HeadScores`` in ``path``: shaped [layers, original heads] of ``model``, all values finite
    (``prune.strategies.check_scores``; the message names the file)."""
    from attribution import HeadScores
    from prune.strategies import check_scores

    scores = HeadScores.load(path)
    try:
        check_scores(scores, model)
    except HeadpruneError as error:
        raise HeadpruneError(f"{name} {path}: {error}") from None
    return scores

