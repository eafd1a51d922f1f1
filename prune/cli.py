"""The ``headprune`` command line: one subcommand per module in ``prune.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
import typing
from collections.abc import Callable

from attribution.core.errors import describe_error
from attribution.core.log import get_logger
from attribution.core.trust import allow_remote_code

# name -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("prune.commands.run", "run a YAML recipe: the whole pipeline, resumable"),
    "validate": ("prune.commands.validate", "check a YAML recipe without running it"),
    "finetune": ("prune.commands.finetune", "fine-tune a sequence classifier (cached)"),
    "attribute": ("prune.commands.attribute", "score attention heads and save HeadScores"),
    "prune": ("prune.commands.prune_heads", "remove heads chosen from a scores file; save the pruned model"),
    "heal": ("prune.commands.heal", "distil the dense model into a pruned one under a wall-clock budget"),
    "evaluate": ("prune.commands.evaluate", "accuracy and other metrics of a (pruned) model"),
    "export": ("prune.commands.export", "export a (pruned) model, e.g. to ONNX"),
    "tree": ("prune.commands.tree", "attribution tree of one input"),
    "triggers": ("prune.commands.triggers", "mine adversarial trigger patterns and attack with them"),
    "explain": ("prune.commands.explain", "token relevance of one input by several methods (HTML)"),
    "faithfulness": ("prune.commands.faithfulness", "deletion benchmark of token-relevance methods"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line too (argparse prints the whole usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the options of that one command alone (the others
    are listed but not built: building ``attribute`` imports torch for its criteria's options)."""
    parser = _Parser(
        prog="headprune",
        description="Find which attention heads of a BERT-like encoder matter, show why, and remove the rest.",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        dest="global_quiet",
        action="store_true",
        help="only warnings and errors: no progress messages or bars (as each command's --quiet)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, also print the Python traceback (for bug reports)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            if name != "validate":  # every other command loads a model (run: also the recipe key)
                command.add_argument(
                    "--trust-remote-code",
                    action="store_true",
                    help="run Python code shipped with the model (an auto_map in its config); off by default: "
                    "such a model is refused",
                )
            command.set_defaults(_run=module.run)
    return parser


def _command(argv: list[str]) -> str:
    """The command named on the command line ("" when none is: ``headprune --help``)."""
    return next((word for word in argv if word in COMMANDS), "")


class _ConsoleHandler(logging.Handler):
    """Plain messages: INFO and below on stdout (where headprune's progress lines have always
    gone), warnings and errors on stderr. The streams are looked up at every message, so a
    redirected ``sys.stdout`` (pytest's capsys, a notebook) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging's contract: report, never raise
            self.handleError(record)


def _quiet_libraries() -> Callable[[], None]:
    """transformers' load reports and weight-loading bars drown headprune's own output. Returns a
    function that restores transformers' previous settings (``main`` may be called from Python)."""
    import transformers

    hf_logging = transformers.utils.logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def main(argv: list[str] | None = None) -> int:
    """Run one command. Messages of the ``headprune`` logger are shown while it runs (INFO and up;
    WARNING and up with ``--quiet``); the handler and the previous log settings are removed and
    restored on return, so repeated calls neither duplicate nor leak output."""
    restore_libraries = _quiet_libraries()
    logger = get_logger()
    previous_level = logger.level
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser(_command(argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # a usage error (one line) is a status; --help still exits
            if done.code in (0, None):
                raise
            return done.code if isinstance(done.code, int) else 2
        if args.global_quiet and hasattr(args, "quiet"):
            args.quiet = True  # the command's own --quiet: no progress bars either
        if args.global_quiet or getattr(args, "quiet", False):
            logger.setLevel(logging.WARNING)
        try:
            with allow_remote_code(getattr(args, "trust_remote_code", False)):
                return int(args._run(args) or 0)
        except KeyboardInterrupt:
            print("headprune: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # the one error boundary: one line, never a traceback unasked
            if args.debug:
                traceback.print_exc(file=sys.stderr)
            message, code = describe_error(error)
            hint = "" if code == 2 or args.debug else " (run again with --debug for the traceback)"
            print(f"headprune: error: {message}{hint}", file=sys.stderr)
            return code
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        restore_libraries()


if __name__ == "__main__":
    sys.exit(main())
