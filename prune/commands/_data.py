"""Command-line options shared by the commands that read a data set."""

from __future__ import annotations

import argparse
from typing import Any

DATA_HELP = (
    "'tweets' (embedded), a hub name[:config], a .csv/.tsv/.json/.jsonl/.parquet file or a directory "
    "(default: %(default)s)"
)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and the column options that say how to read it."""
    parser.add_argument("--data", default="tweets", help=DATA_HELP)
    parser.add_argument("--text-column", default=None, help="text column of --data (guessed if omitted)")
    parser.add_argument("--text-pair-column", default=None, help="second text column for sentence-pair tasks")
    parser.add_argument("--label-column", default=None, help="label column of --data (guessed if omitted)")


def data_spec(args: argparse.Namespace) -> Any:
    """The ``DataSpec`` the data options describe (``max_length`` from ``--max-length``)."""
    from attribution.core.data import DataSpec

    return DataSpec(
        name=args.data,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        max_length=args.max_length,
    )
