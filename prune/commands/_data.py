"""Command-line options shared by the commands that read a data set."""

from __future__ import annotations

import argparse
from typing import Any

DATA_HELP = (
    "'tweets' (embedded), a hub name[:config], a .csv/.tsv/.json/.jsonl/.parquet file or a directory "
    "(default: %(default)s)"
)


def add_data_arguments(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """``--data`` (``purpose`` says what for, ahead of the usual help) and the column and split
    options that say how to read it."""
    parser.add_argument("--data", default="tweets", help=f"{purpose}: {DATA_HELP}" if purpose else DATA_HELP)
    parser.add_argument("--text-column", default=None, help="text column of --data (guessed if omitted)")
    parser.add_argument("--text-pair-column", default=None, help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", default=None, help="label column of --data (guessed if omitted)")
    add_split_map_argument(parser)


def add_split_map_argument(parser: argparse.ArgumentParser) -> None:
    """``--split-map SPLIT=SOURCE``: repeatable, and each value may be a comma-separated list."""
    parser.add_argument(
        "--split-map",
        action="append",
        default=[],
        metavar="SPLIT=SOURCE",
        help="use the data set's split SOURCE as SPLIT (train, validation or test) instead of carving it from "
        "train, e.g. validation=validation_matched; repeat it or separate pairs with commas",
    )


def split_map(args: argparse.Namespace) -> dict[str, str]:
    """``{split: source}`` from ``--split-map`` (one-line errors for malformed or repeated pairs)."""
    from attribution.core.data import parse_split_map

    return parse_split_map(args.split_map)


def data_spec(args: argparse.Namespace) -> Any:
    """The ``DataSpec`` the data options describe (``max_length`` from ``--max-length``)."""
    from attribution.core.data import DataSpec

    return DataSpec(
        name=args.data,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        max_length=args.max_length,
        split_map=split_map(args),
    )
