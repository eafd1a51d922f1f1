"""Hostile input, command by command: every bad input below exits 2 with exactly one line on stderr,
no traceback, and nothing created or changed under the output path (nor in the inputs).

Each case builds its bad input in its own temporary directory, snapshots that directory and the
shared world (names, sizes, contents), runs ``prune.cli.main`` in-process, and compares."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from prune.cli import main
from tests.tiny_recipe import tiny_csv, tiny_model_dir, tiny_recipe


@dataclass
class World:
    model: Path  # dense, 2 layers x 4 heads, classes neg/pos, 64 positions
    pruned: Path  # heads [[1, 3], [0, 1]] kept, weights stamped with them
    data: Path  # text,label csv labelled neg/pos
    scores: Path  # HeadScores 2 x 4
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from attribution import HeadScores, instrument
    from prune.checkpoints import load_model, save_pruned

    root = tmp_path_factory.mktemp("world")
    model_dir = tiny_model_dir(root / "m")
    data = tiny_csv(root / "data.csv", rows=60)
    model, tokenizer = load_model(model_dir)
    for layer, keep in enumerate([[1, 3], [0, 1]]):
        instrument.keep_heads_in_layer(model, layer, keep)
    pruned = save_pruned(model, root / "pruned", tokenizer)
    scores = root / "scores.json"
    HeadScores(torch.arange(8.0).view(2, 4), "taylor", {}).save(scores)
    return World(model_dir, pruned, data, scores, root)


# ---- helpers building bad inputs -------------------------------------------------------------


def copy_model(source: Path, tmp: Path, name: str = "bad") -> Path:
    target = tmp / name
    shutil.copytree(source, target)
    return target


def truncated(source: Path, tmp: Path) -> Path:
    target = copy_model(source, tmp)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return target


def random_weights(w: World, tmp: Path) -> Path:
    target = copy_model(w.model, tmp)
    (target / "model.safetensors").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    return target


def edited_config(source: Path, tmp: Path, **changes) -> Path:
    target = copy_model(source, tmp)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


def remote_code(source: Path, tmp: Path) -> Path:
    target = edited_config(source, tmp, auto_map={"AutoModelForSequenceClassification": "evil.Model"})
    (target / "evil.py").write_text("raise SystemExit('the shipped code ran')\n")
    return target


def csv(tmp: Path, labels: list[str], name: str = "bad.csv") -> Path:
    path = tmp / name
    rows = [f"good movie {i % 7} really,{labels[i % len(labels)]}" for i in range(60)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def scores_file(tmp: Path, body: dict | str | bytes) -> Path:
    if isinstance(body, dict):
        body = json.dumps({"format": "headprune.HeadScores", "version": 2, "criterion": "taylor", **body})
    return write(tmp, "scores.json", body)


def existing_dir(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def existing_file(tmp: Path, name: str) -> Path:
    return write(tmp, name, "keep me\n")


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


def recipe(tmp: Path, w: World, **blocks: str) -> Path:
    """A recipe over the world's model and data (model/data blocks replaceable)."""
    defaults = {
        "model": f"model: {w.model}\n",
        "data": f"data:\n  name: {w.data}\n  max_length: 16\n",
    }
    defaults.update(blocks)
    return write(tmp, "recipe.yaml", "".join(defaults.values()) + "score:\n  examples: 4\n  criteria: [taylor]\n")


def readonly_dir() -> Path | None:
    """A directory nobody may write in: /sys for root (permission bits do not stop root)."""
    import os
    import tempfile

    candidate = Path("/sys")
    if not candidate.is_dir():
        return None
    try:
        handle, probe = tempfile.mkstemp(dir=candidate)
    except OSError:
        return candidate
    os.close(handle)
    os.unlink(probe)
    return None


# ---- the table: id -> build(world, tmp) -> argv -------------------------------------------------

Case = Callable[[World, Path], list[str]]


def attribute(w: World, model: Path | str | None = None, *extra: str, out: str = "scores.json", tmp: Path) -> list[str]:
    return ["attribute", "--model", str(model or w.model), "--data", str(w.data), "--criterion", "taylor",
            "--examples", "4", "--split", "train", "--out", str(tmp / out), "--quiet", *extra]  # fmt: skip


def evaluate(w: World, tmp: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["evaluate", "--model", str(model or w.model), "--data", str(w.data), "--max-examples", "4",
            "--quiet", *extra]  # fmt: skip


def prune(w: World, tmp: Path, *extra: str, scores: Path | None = None, data: Path | None = None) -> list[str]:
    how = [] if any(x in extra for x in ("--sparsity", "--count")) else ["--sparsity", "0.5"]
    return ["prune", "--model", str(w.model), "--scores", str(scores or w.scores), *how, "--data", str(data or w.data),
            "--out", str(tmp / "pruned"), "--quiet", *extra]  # fmt: skip


def heal(w: World, tmp: Path, *extra: str, teacher: Path | None = None, out: Path | None = None) -> list[str]:
    return ["heal", "--model", str(w.pruned), "--teacher", str(teacher or w.model), "--data", str(w.data),
            "--max-steps", "1", "--train-examples", "8", "--held-out-examples", "4", "--out",
            str(out or tmp / "healed"), "--quiet", *extra]  # fmt: skip


def export(w: World, tmp: Path, *extra: str, model: Path | None = None, out: Path | None = None) -> list[str]:
    return ["export", "--model", str(model or w.pruned), "--out", str(out or tmp / "onnx"), *extra]


def finetune(w: World, tmp: Path, *extra: str, base: Path | None = None, out: Path | None = None) -> list[str]:
    return ["finetune", "--base", str(base or w.model), "--data", str(w.data), "--train-examples", "8",
            "--batch-size", "4", "--max-length", "16", "--out", str(out or tmp / "ft"), "--quiet", *extra]  # fmt: skip


def tree(w: World, tmp: Path, *extra: str) -> list[str]:
    return ["tree", "--model", str(w.model), "--text", "good movie", "--n-steps", "2", "--quiet", *extra]


def triggers(w: World, tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["triggers", "--model", str(w.model), "--data", str(data or w.data), "--examples", "4", "--n-steps", "2",
            "--out", str(tmp / "t.json"), "--quiet", *extra]  # fmt: skip


def explain(w: World, tmp: Path, *extra: str) -> list[str]:
    return ["explain", "--model", str(w.model), "--text", "good movie", "--methods", "attention",
            "--out", str(tmp / "e.html"), *extra]  # fmt: skip


def faith(w: World, tmp: Path, *extra: str) -> list[str]:
    return ["faithfulness", "--model", str(w.model), "--data", str(w.data), "--examples", "4", "--methods",
            "attention", "--out", str(tmp / "f"), "--quiet", *extra]  # fmt: skip


def run(w: World, tmp: Path, path: Path, *extra: str) -> list[str]:
    return ["run", str(path), "--out", str(tmp / "run"), "--quiet", *extra]


CASES: dict[str, Case] = {
    # attribute: models that do not load, data that does not fit, outputs of the wrong kind, numbers
    "attribute-truncated-dense-weights": lambda w, t: attribute(w, truncated(w.model, t), tmp=t),
    "attribute-random-bytes-weights": lambda w, t: attribute(w, random_weights(w, t), tmp=t),
    "attribute-truncated-pruned-weights": lambda w, t: attribute(w, truncated(w.pruned, t), tmp=t),
    "attribute-pruned-config-other-heads": lambda w, t: attribute(
        w, edited_config(w.pruned, t, headprune_kept_heads=[[0, 2], [2, 3]]), tmp=t
    ),
    "attribute-model-without-weights": lambda w, t: attribute(
        w, (lambda d: ((d / "model.safetensors").unlink(), d)[1])(copy_model(w.model, t)), tmp=t
    ),
    "attribute-config-not-json": lambda w, t: attribute(
        w, (lambda d: (write(d, "config.json", "{nope"), d)[1])(copy_model(w.model, t)), tmp=t
    ),
    "attribute-config-not-utf8": lambda w, t: attribute(
        w, (lambda d: (write(d, "config.json", b'{"a": "\xff\xfe"}'), d)[1])(copy_model(w.model, t)), tmp=t
    ),
    "attribute-remote-code": lambda w, t: attribute(w, remote_code(w.model, t), tmp=t),
    "attribute-out-is-a-directory": lambda w, t: attribute(w, None, tmp=t, out=existing_dir(t, "s.json").name),
    "attribute-out-under-a-file": lambda w, t: attribute(w, None, tmp=t, out=f"{existing_file(t, 'f').name}/s.json"),
    "attribute-plot-is-a-directory": lambda w, t: attribute(w, None, "--plot", str(existing_dir(t, "p.png")), tmp=t),
    "attribute-cat-dog-labels": lambda w, t: [*attribute(w, None, tmp=t)[:4], str(csv(t, ["cat", "dog"])),
                                              *attribute(w, None, tmp=t)[5:]],  # fmt: skip
    "attribute-five-integer-classes": lambda w, t: [*attribute(w, None, tmp=t)[:4], str(csv(t, list("01234"))),
                                                    *attribute(w, None, tmp=t)[5:]],  # fmt: skip
    "attribute-max-length-over-positions": lambda w, t: attribute(w, None, "--max-length", "1000", tmp=t),
    "attribute-negative-seed": lambda w, t: [*attribute(w, None, tmp=t), "--criterion", "random", "--seed", "-1"],
    "attribute-huge-seed": lambda w, t: [*attribute(w, None, tmp=t), "--criterion", "random", "--seed", str(10**30)],
    "attribute-examples-zero": lambda w, t: attribute(w, None, "--examples", "0", tmp=t),
    # evaluate
    "evaluate-cat-dog-labels": lambda w, t: [*evaluate(w, t)[:4], str(csv(t, ["cat", "dog"])), *evaluate(w, t)[5:]],
    "evaluate-five-integer-classes": lambda w, t: [*evaluate(w, t)[:4], str(csv(t, list("01234"))),
                                                   *evaluate(w, t)[5:]],  # fmt: skip
    "evaluate-labels-swapped-order": lambda w, t: [*evaluate(w, t, model=edited_config(
        w.model, t, id2label={"0": "pos", "1": "neg"}, label2id={"pos": 0, "neg": 1}))],  # fmt: skip
    "evaluate-max-length-over-positions": lambda w, t: evaluate(w, t, "--max-length", "65"),
    "evaluate-out-is-a-directory": lambda w, t: evaluate(w, t, "--out", str(existing_dir(t, "r.json"))),
    "evaluate-unknown-split": lambda w, t: evaluate(w, t, "--split", "nosuch"),
    "evaluate-data-json-of-binary-bytes": lambda w, t: [*evaluate(w, t)[:4], str(write(t, "d.json", b"\x00\xff")),
                                                        *evaluate(w, t)[5:]],  # fmt: skip
    "evaluate-unknown-metric": lambda w, t: evaluate(w, t, "--metrics", "accuracy,bogus"),
    "evaluate-batch-size-not-a-number": lambda w, t: evaluate(w, t, "--batch-size", "many"),
    # prune: scores files of every wrong kind
    "prune-scores-without-values": lambda w, t: prune(w, t, scores=scores_file(t, {"shape": [2, 4]})),
    "prune-scores-ragged-rows": lambda w, t: prune(w, t, scores=scores_file(t, {"values": [[1, 2, 3, 4], [1, 2]]})),
    "prune-scores-string-values": lambda w, t: prune(w, t, scores=scores_file(t, {"values": [["a"] * 4] * 2})),
    "prune-scores-not-utf8": lambda w, t: prune(w, t, scores=scores_file(t, b"\xff\xfe\x00{")),
    "prune-scores-is-a-directory": lambda w, t: prune(w, t, scores=existing_dir(t, "scores.json")),
    "prune-scores-other-shape": lambda w, t: prune(w, t, scores=scores_file(t, {"values": [[1.0] * 4] * 3})),
    "prune-scores-nan": lambda w, t: prune(w, t, scores=scores_file(t, '{"format": "headprune.HeadScores", '
                                           '"version": 2, "criterion": "taylor", "values": [[NaN, 1, 2, 3], '
                                           '[1, 2, 3, 4]]}')),  # fmt: skip
    "prune-out-is-a-file": lambda w, t: [*prune(w, t)[:-3], "--out", str(existing_file(t, "pruned")), "--quiet"],
    "prune-sparsity-above-one": lambda w, t: prune(w, t, "--sparsity", "1.5"),
    "prune-sparsity-nan": lambda w, t: prune(w, t, "--sparsity", "nan"),
    "prune-evaluate-cat-dog": lambda w, t: prune(w, t, "--evaluate", data=csv(t, ["cat", "dog"])),
    # heal
    "heal-negative-seed": lambda w, t: heal(w, t, "--seed", "-1"),
    "heal-bad-budget": lambda w, t: heal(w, t, "--budget", "soon"),
    "heal-out-is-a-file": lambda w, t: heal(w, t, out=existing_file(t, "healed")),
    "heal-teacher-truncated": lambda w, t: heal(w, t, teacher=truncated(w.model, t)),
    "heal-max-steps-zero": lambda w, t: heal(w, t, "--max-steps", "0"),
    # export
    "export-opset-99": lambda w, t: export(w, t, "--opset", "99"),
    "export-out-is-a-file": lambda w, t: export(w, t, out=existing_file(t, "onnx")),
    "export-out-names-a-file": lambda w, t: export(w, t, out=t / "model.onnx"),
    "export-atol-nan": lambda w, t: export(w, t, "--atol", "nan"),
    "export-remote-code": lambda w, t: export(w, t, model=remote_code(w.model, t)),
    "export-missing-model": lambda w, t: export(w, t, model=t / "nothing-here"),
    "export-check-fails": lambda w, t: export(w, t, "--atol", "1e-30"),
    # tree, triggers, explain, faithfulness
    "tree-max-length-over-positions": lambda w, t: tree(w, t, "--max-length", "500"),
    "tree-out-is-a-directory": lambda w, t: tree(w, t, "--out", str(existing_dir(t, "t.png"))),
    "tree-tau-nan": lambda w, t: tree(w, t, "--tau", "nan"),
    "triggers-negative-seed": lambda w, t: triggers(w, t, "--seed", "-1"),
    "triggers-cat-dog-labels": lambda w, t: triggers(w, t, data=csv(t, ["cat", "dog"])),
    "triggers-patterns-garbage": lambda w, t: triggers(w, t, "--patterns", str(write(t, "p.json", "[1, 2"))),
    "explain-huge-seed": lambda w, t: explain(w, t, "--seed", str(10**30)),
    "explain-max-length-over-positions": lambda w, t: explain(w, t, "--max-length", "1000"),
    "explain-json-is-a-directory": lambda w, t: explain(w, t, "--json", str(existing_dir(t, "e.json"))),
    "faithfulness-fraction-above-one": lambda w, t: faith(w, t, "--fractions", "0,0.5,1.5"),
    "faithfulness-fraction-nan": lambda w, t: faith(w, t, "--fractions", "0,nan"),
    "faithfulness-out-is-a-file": lambda w, t: [*faith(w, t)[:-3], "--out", str(existing_file(t, "f")), "--quiet"],
    "faithfulness-negative-seed": lambda w, t: faith(w, t, "--seed", "-1"),
    # finetune
    "finetune-lr-inf": lambda w, t: finetune(w, t, "--lr", "inf"),
    "finetune-lr-nan": lambda w, t: finetune(w, t, "--lr", "nan"),
    "finetune-lr-negative": lambda w, t: finetune(w, t, "--lr=-1e-3"),
    "finetune-negative-seed": lambda w, t: finetune(w, t, "--seed", "-1"),
    "finetune-base-truncated": lambda w, t: finetune(w, t, base=truncated(w.model, t)),
    "finetune-base-remote-code": lambda w, t: finetune(w, t, base=remote_code(w.model, t)),
    "finetune-out-is-a-file": lambda w, t: finetune(w, t, out=existing_file(t, "ft")),
    "finetune-max-length-over-positions": lambda w, t: [*finetune(w, t), "--max-length", "100"],
    # run and validate: recipes
    "run-billion-laughs": lambda w, t: run(w, t, write(t, "laughs.yaml", LAUGHS)),
    "run-oversize-recipe": lambda w, t: run(w, t, write(t, "big.yaml", "# padding\n" * 40000)),
    "run-model-truncated": lambda w, t: run(w, t, recipe(t, w, model=f"model: {truncated(w.model, t)}\n")),
    "run-model-remote-code": lambda w, t: run(w, t, recipe(t, w, model=f"model: {remote_code(w.model, t)}\n")),
    "run-data-cat-dog": lambda w, t: run(w, t, recipe(t, w, data=f"data:\n  name: {csv(t, ['cat', 'dog'])}\n")),
    "run-max-length-over-positions": lambda w, t: run(w, t, recipe(t, w), "--set", "data.max_length=1000"),
    "run-data-seed-negative": lambda w, t: run(w, t, recipe(t, w), "--set", "data.seed=-1"),
    "run-seed-huge": lambda w, t: run(w, t, recipe(t, w), "--set", f"seed={10**30}"),
    "run-finetune-lr-inf": lambda w, t: run(w, t, recipe(t, w), "--set", "finetune.lr=.inf"),
    "run-out-is-a-file": lambda w, t: [*run(w, t, recipe(t, w))[:2], "--out", str(existing_file(t, "run"))],
    "validate-data-seed-negative": lambda w, t: ["validate", str(recipe(t, w)), "--set", "data.seed=-1"],
    "validate-seed-huge": lambda w, t: ["validate", str(recipe(t, w)), "--set", f"seed={10**30}"],
    "validate-billion-laughs": lambda w, t: ["validate", str(write(t, "laughs.yaml", LAUGHS))],
    "validate-small-alias": lambda w, t: ["validate", str(write(t, "a.yaml", "model: &m minilm\nname: *m\n"))],
    "validate-recipe-is-a-directory": lambda w, t: ["validate", str(existing_dir(t, "r.yaml"))],
    "validate-recipe-not-utf8": lambda w, t: ["validate", str(write(t, "r.yaml", b"model: \xff\xfe\n"))],
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: relative path -> content hash ("dir" for directories)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, world, tmp_path, capsys, monkeypatch):
    argv = CASES[case](world, tmp_path)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # a prompt would read EOF, not hang
    before, world_before = snapshot(tmp_path), snapshot(world.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    assert snapshot(tmp_path) == before
    assert snapshot(world.root) == world_before


def test_there_are_at_least_forty_distinct_cases_across_every_command():
    commands = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 40
    assert commands == {"run", "validate", "finetune", "attribute", "prune", "heal", "evaluate", "export", "tree",
                        "triggers", "explain", "faithfulness"}  # fmt: skip


def test_read_only_output_directory_is_one_line(world, capsys):
    readonly = readonly_dir()
    if readonly is None:
        pytest.skip("no directory here refuses writes (root on a writable file system)")
    out = readonly / "headprune-test" / "scores.json"
    code = main(attribute(world, None, tmp=readonly / "headprune-test", out="scores.json"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot write" in err
    assert not out.parent.exists()


def test_the_remote_code_flag_opts_in(world, tmp_path, capsys):
    """With --trust-remote-code the auto_map is no longer refused by headprune: transformers tries to
    import the shipped module (absent here, so it fails), proving the refusal came from the flag."""
    model = remote_code(world.model, tmp_path)
    (model / "evil.py").unlink()
    code = main(attribute(world, model, "--trust-remote-code", tmp=tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and "ships its own Python code" not in err


def test_an_unexpected_error_is_one_line_with_a_debug_pointer(world, tmp_path, capsys, monkeypatch):
    import prune.commands.validate as validate

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(validate, "run", broken)
    assert main(["validate", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["headprune: error: ZeroDivisionError: boom (run again with --debug for the "
                                        "traceback)"]  # fmt: skip
    assert main(["--debug", "validate", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "headprune: error: ZeroDivisionError: boom"


def test_a_pruned_checkpoint_records_its_heads_in_the_weights(world, tmp_path):
    """Old checkpoints (no metadata) still load; new ones carry the kept heads in the safetensors
    header, and a config listing other heads with the same counts is refused."""
    from safetensors import safe_open

    from attribution.core.errors import HeadpruneError
    from prune.checkpoints import load_model

    with safe_open(str(world.pruned / "model.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["headprune_kept_heads"]) == [[1, 3], [0, 1]]
    unstamped = copy_model(world.pruned, tmp_path, "old")
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(unstamped / "model.safetensors")), str(unstamped / "model.safetensors"), {"format": "pt"})
    old, _ = load_model(unstamped)
    new, tokenizer = load_model(world.pruned)
    batch = tokenizer(["good movie", "bad food"], return_tensors="pt", padding=True)
    assert torch.equal(old(**batch).logits, new(**batch).logits)
    swapped = edited_config(world.pruned, tmp_path, headprune_kept_heads=[[0, 2], [2, 3]])
    with pytest.raises(HeadpruneError, match="does not match the units the weights"):
        load_model(swapped)


def test_a_valid_recipe_and_command_still_work(world, tmp_path, capsys):
    """The checks refuse bad input only: the same commands on good input exit 0."""
    assert main(attribute(world, None, tmp=tmp_path)) == 0
    assert main(["validate", str(recipe(tmp_path, world))]) == 0
    assert main(evaluate(world, tmp_path)) == 0
    path = tiny_recipe(tmp_path / "r")
    assert main(["validate", str(path)]) == 0


def test_remote_code_is_refused_in_a_process_with_stdin_closed(world, tmp_path):
    """The real command line, stdin closed: no prompt (it would fail or hang), one line, and the
    shipped module never runs (it would leave a marker file)."""
    import os
    import subprocess
    import sys

    model = remote_code(world.model, tmp_path)
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "prune.cli", "evaluate", "--model", str(model), "--data", str(world.data)],
        preexec_fn=lambda: os.close(0),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "ships its own Python code" in result.stderr
    assert not marker.exists()


def test_describe_error_names_the_file_and_keeps_one_line(tmp_path):
    """The boundary's table: OS errors name the file, decoding errors say what failed, all on one
    line with status 2; only an exception nobody anticipated gets status 1."""
    from safetensors.torch import load_file

    from attribution.core.errors import HeadpruneError, describe_error

    bad = write(tmp_path, "w.safetensors", b"\x01\x02")
    found = {}
    for name, action in {
        "missing": lambda: open(tmp_path / "nope.txt"),
        "directory": lambda: open(tmp_path),
        "json": lambda: json.loads("{\n  nope"),
        "utf8": lambda: b"\xff".decode("utf-8"),
        "safetensors": lambda: load_file(str(bad)),
        "ours": lambda: (_ for _ in ()).throw(HeadpruneError("line one\nline two")),
        "bug": lambda: {}["key"],
    }.items():
        try:
            action()
        except Exception as error:  # noqa: BLE001 - every kind is the point
            found[name] = describe_error(error)
    assert found["missing"] == (f"{tmp_path / 'nope.txt'}: No such file or directory", 2)
    assert found["directory"] == (f"{tmp_path}: Is a directory", 2)
    assert found["json"] == ("invalid JSON (Expecting property name enclosed in double quotes at line 2, column 3)", 2)
    assert found["utf8"][1] == 2 and "not UTF-8" in found["utf8"][0]
    assert found["safetensors"][1] == 2 and found["safetensors"][0].startswith("unreadable safetensors weights")
    assert found["ours"] == ("line one line two", 2)
    assert found["bug"] == ("KeyError: 'key'", 1)
