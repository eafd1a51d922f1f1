"""Messages go through the "headprune" logger: library code logs and never configures logging; the
CLI shows INFO lines (as the old prints did) unless --quiet, and leaves no handler behind."""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import pytest
import torch

from attribution.scores import HeadScores
from prune import cli
from prune.strategies import iterative_pruning
from tests.conftest import tiny_model

INFO_LINE = "[hello] running (not run before)"


def test_library_functions_log_through_the_headprune_logger(caplog):
    model = tiny_model("bert", layers=2, heads=2)
    with caplog.at_level(logging.DEBUG, logger="headprune"):
        iterative_pruning(
            model,
            lambda m: HeadScores(torch.arange(4.0).reshape(2, 2), "r"),
            lambda m: 1.0,
            step=0.25,
            progress=False,
        )
    records = [r for r in caplog.records if r.name.startswith("headprune")]  # not transformers' own
    assert records and {r.name for r in records} == {"headprune.strategies"}
    assert "iterative pruning round 1: 1 heads pruned" in records[0].getMessage()
    assert "stopped: no head can be pruned" in records[-1].getMessage()


@pytest.fixture
def hello(monkeypatch):
    """A ``headprune hello`` command that logs (INFO and WARNING) and prints its result."""
    module = types.ModuleType("headprune_hello_command")
    seen: list[bool] = []

    def add_arguments(parser):
        parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        seen.append(args.quiet)
        log = logging.getLogger("headprune.hello")
        log.info(INFO_LINE)
        log.debug("debug detail")
        log.warning("careful")
        print("result: 42")
        return 0

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "hello", (module.__name__, "log something"))
    return seen


def test_cli_shows_info_lines_by_default_once_per_call(hello, capsys):
    for _ in range(2):  # a second main() call must not repeat lines (the handler is removed)
        assert cli.main(["hello"]) == 0
        captured = capsys.readouterr()
        assert captured.out.splitlines() == [INFO_LINE, "result: 42"]  # INFO on stdout, as print did
        assert captured.err.splitlines() == ["careful"]
    assert hello == [False, False]


@pytest.mark.parametrize("argv", [["hello", "--quiet"], ["-q", "hello"], ["--quiet", "hello"]])
def test_cli_quiet_hides_info_lines_but_not_warnings_or_results(hello, capsys, argv):
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["result: 42"]
    assert captured.err.splitlines() == ["careful"]
    assert hello == [True]  # the global -q also turns the command's progress bars off


def test_cli_leaves_logging_and_transformers_as_it_found_them(hello, capsys):
    import transformers

    hf_logging = transformers.utils.logging
    logger = logging.getLogger("headprune")
    handlers, level = list(logger.handlers), logger.level
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        assert cli.main(["hello"]) == 0
        assert hf_logging.get_verbosity() == logging.INFO
        assert hf_logging.is_progress_bar_enabled()
        assert cli.main(["hello", "--no-such-option"]) == 2  # a usage error is a status, not an exit
        assert logger.handlers == handlers and logger.level == level
        assert hf_logging.get_verbosity() == logging.INFO
    finally:
        hf_logging.set_verbosity(verbosity)
    capsys.readouterr()


def test_importing_headprune_installs_no_handlers():
    # a fresh interpreter: pytest itself puts handlers on the root logger
    code = """
import importlib, logging, pkgutil
import attribution, prune
names = [m.name for p in (attribution, prune) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
headprune = logging.getLogger("headprune")
print(len(names), len(logging.getLogger().handlers), len(headprune.handlers), headprune.level, headprune.propagate)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    modules, root_handlers, handlers, level, propagate = done.stdout.split()
    assert int(modules) > 20
    assert (root_handlers, handlers, level, propagate) == ("0", "0", str(logging.NOTSET), "True")
