"""The ``headprune`` command line: one subcommand per module in ``prune.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

from attribution.errors import HeadpruneError

# name -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("prune.commands.finetune", "fine-tune a sequence classifier (cached)"),
    "attribute": ("prune.commands.attribute", "score attention heads and save HeadScores"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except HeadpruneError as error:
        print(f"headprune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
