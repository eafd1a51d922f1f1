"""The ``headprune`` command line: one subcommand per module in ``prune.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

from attribution.core.errors import HeadpruneError

# name -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("prune.commands.run", "run a YAML recipe: the whole pipeline, resumable"),
    "validate": ("prune.commands.validate", "check a YAML recipe without running it"),
    "finetune": ("prune.commands.finetune", "fine-tune a sequence classifier (cached)"),
    "attribute": ("prune.commands.attribute", "score attention heads and save HeadScores"),
    "prune": ("prune.commands.prune_heads", "remove heads chosen from a scores file; save the pruned model"),
    "evaluate": ("prune.commands.evaluate", "accuracy and other metrics of a (pruned) model"),
    "export": ("prune.commands.export", "export a (pruned) model, e.g. to ONNX"),
    "tree": ("prune.commands.tree", "attribution tree of one input"),
    "triggers": ("prune.commands.triggers", "mine adversarial trigger patterns and attack with them"),
    "explain": ("prune.commands.explain", "token relevance of one input by several methods (HTML)"),
    "faithfulness": ("prune.commands.faithfulness", "deletion benchmark of token-relevance methods"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headprune",
        description="Find which attention heads of a BERT-like encoder matter, show why, and remove the rest.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def _quiet_libraries() -> None:
    """transformers' load reports and weight-loading bars drown headprune's own output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
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
