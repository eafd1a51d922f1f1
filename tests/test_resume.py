"""Resume that verifies: a rerun checks the size and sha256 of every output, reruns the stage whose
outputs changed (and its dependants only when that stage's output bytes change), skips stages whose
input bytes are unchanged, computes only new sweep points, removes the temporaries of killed runs;
identical runs write identical files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prune.pipeline import run_recipe
from prune.pipeline.artifacts import StageRecord, StageTiming
from prune.pipeline.fingerprints import file_digest
from prune.pipeline.outdir import LOCK_NAME
from prune.recipe import load_recipe
from tests.test_stages import logged
from tests.tiny_recipe import tiny_model_dir, tiny_recipe

ROOT = Path(__file__).parent.parent
SMALL = {
    "score": (
        "score:\n  split: train\n  examples: 8\n  batch_size: 4\n  shard_size: 4\n  criteria:\n"
        "    taylor: {}\n    fisher: {}\n"
    ),
    "sweep": "sweep:\n  fractions: [0.25, 0.5]\n  split: validation\n  examples: 24\n  batch_size: 8\n",
    "prune": "prune:\n  criterion: taylor\n  target: {fraction: 0.5}\n",
    "repair": "",
    "cost": "cost: null\n",
    "export": "export:\n  check_examples: 4\n",
}
STAGES = ["dense", "score-taylor", "score-fisher", "sweep", "prune", "export", "report"]
# files whose bytes are measurements (latencies) or show them, and the markers recording their digests
MEASURED = {"export.json", "report.md", "report.html", "stages/export.json", "stages/report.json"}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of the small recipe (copied by each test that changes it)."""
    tmp = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(tmp, **SMALL)
    out = tmp / "out"
    result = run_recipe(load_recipe(recipe), out, progress=False, command="headprune run small")
    assert result.ran == STAGES
    return recipe, out


def rerun(recipe: Path, out: Path, overrides: list[str] | None = None):
    with logged() as lines:
        result = run_recipe(load_recipe(recipe, overrides or []), out, progress=False, command="headprune run small")
    return result, lines


def copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(out, target)
    return target


def test_markers_record_size_and_sha256_of_every_output(finished):
    _, out = finished
    for stage in STAGES:
        record = StageRecord.load(out / "stages" / f"{stage}.json")
        assert record.files and sorted(record.digests) == sorted(record.files)
        for name, digest in record.digests.items():
            assert digest == file_digest(out / name), name
    # the times live beside the markers, and the report still shows each criterion's scoring time
    for stage in STAGES:
        assert StageTiming.load(out / "stages" / f"{stage}.time.json").seconds >= 0
    md = (out / "report.md").read_text()
    assert re.search(r"\| taylor \| 8 \| [^|]+ \| \d+\.\d s \|", md), md
    # every file of the saved model is recorded, not just its config
    prune = StageRecord.load(out / "stages" / "prune.json")
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= set(prune.files)


def test_truncated_onnx_reruns_export_only(finished, tmp_path):
    recipe, out = finished
    out = copy(out, tmp_path)
    onnx = out / "onnx" / "model.onnx"
    size = onnx.stat().st_size
    with open(onnx, "r+b") as handle:
        handle.truncate(size // 2)
    result, lines = rerun(recipe, out)
    assert result.ran[0] == "export" and set(result.ran) <= {"export", "report"}
    why = [line for line in lines if line.startswith("[export] running")]
    assert why == [f"[export] running (output changed (onnx/model.onnx: {size // 2} bytes, {size} recorded))"]
    assert onnx.stat().st_size == size


def test_truncated_weights_rerun_prune_and_identical_bytes_stop_there(finished, tmp_path):
    recipe, out = finished
    out = copy(out, tmp_path)
    weights = out / "model" / "model.safetensors"
    before = weights.read_bytes()
    weights.write_bytes(before[:100])
    result, lines = rerun(recipe, out)
    # prune writes the same bytes again, so export (which reads them) and the report are skipped
    assert result.ran == ["prune"]
    assert result.skipped == [s for s in STAGES if s != "prune"]
    why = "[prune] running (output changed (model/model.safetensors: 100 bytes,"
    assert any(line.startswith(why) for line in lines)
    assert weights.read_bytes() == before


def test_changed_content_of_the_same_size_and_a_missing_file_are_found(finished, tmp_path):
    recipe, out = finished
    out = copy(out, tmp_path)
    scores = out / "scores" / "fisher.json"
    text = scores.read_text()
    original = text
    digit = next(i for i, ch in enumerate(text) if ch.isdigit() and i > text.index('"values"'))
    text = text[:digit] + ("1" if text[digit] != "1" else "2") + text[digit + 1 :]
    scores.write_text(text)
    (out / "dense.json").unlink()
    result, lines = rerun(recipe, out)
    assert result.ran == ["dense", "score-fisher"]  # both rewrite the bytes they had: nothing downstream
    assert "[score-fisher] running (output changed (scores/fisher.json: content differs from the recorded sha256))" in (
        lines
    )
    assert "[dense] running (output missing (dense.json))" in lines
    assert scores.read_text() == original


def test_added_fraction_computes_only_the_new_points_and_skips_unaffected_stages(finished, tmp_path):
    recipe, out = finished
    out = copy(out, tmp_path)
    old = {p.name: p.stat().st_mtime_ns for p in (out / "sweep").iterdir()}
    overrides = ["sweep.fractions=[0.25, 0.5, 0.75]"]
    result, lines = rerun(recipe, out, overrides)
    # prune's criterion and fraction are fixed: it does not read the sweep, so it and export stay
    assert result.ran == ["sweep", "report"]
    record = StageRecord.load(out / "stages" / "sweep.json")
    assert record.outputs["points_computed"] == 2 and record.outputs["points_reused"] == 5  # dense + 2 x 2
    assert "[sweep] 5 of 7 points already measured, reused" in lines
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sweep").iterdir() if p.name in old} == old
    # the resumed sweep is the sweep a fresh run computes, byte for byte
    fresh = tmp_path / "fresh"
    run_recipe(load_recipe(recipe, overrides), fresh, progress=False)
    assert (out / "sweep.json").read_bytes() == (fresh / "sweep.json").read_bytes()


def test_temporaries_of_killed_runs_are_removed_and_nothing_else(finished, tmp_path):
    recipe, out = finished
    out = copy(out, tmp_path)
    # a real kill in the middle of an atomic write (SIGKILL: no cleanup runs)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from attribution.core.io import atomic_output\n"
            "with atomic_output(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'half an onnx file')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
            str(out / "onnx" / "model.onnx"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert killed.returncode == -9
    left = [p for p in (out / "onnx").iterdir() if p.name.startswith(".model.onnx.")]
    assert len(left) == 1
    pid = dead_pid()
    ours = [
        out / "scores" / f".fisher.json.{pid}.0badc0de.tmp.json",
        out / ".model.k2j4_x9q.tmp",  # a save_pruned directory
        out / ".model.old",  # a model parked while save_pruned swapped it in
        out / ".onnx.0a1b2c3d.tmp",  # an export_directory directory
    ]
    ours[0].write_text("{")
    for folder in ours[1:]:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    theirs = [
        out / "notes.tmp",
        out / ".model.onnx.tmp",
        out / f".draft.{pid}.tmp.txt",
        out / ".settings.old",  # a file, not a model directory
        out / ".photos.old" / "cat.jpg",  # a directory of the user's
        out / "scores" / f"fisher.json.{pid}.0badc0de.tmp.json",  # no leading dot
    ]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    result, lines = rerun(recipe, out)
    assert result.ran == []
    assert not any(p.exists() for p in [*left, *ours])
    assert all(p.read_text() == "mine" for p in theirs)
    assert sum("temporary file(s) of an interrupted run" in line for line in lines) == 1
    assert any(line.startswith("removed 5 temporary file(s)") for line in lines)


def test_identical_runs_write_identical_files(finished, tmp_path):
    recipe, out = finished
    again = tmp_path / "again"
    run_recipe(load_recipe(recipe), again, progress=False, command="headprune run small")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    # shards are resume state (each holds its own scoring time), not results
    compared = [f for f in files if f not in MEASURED and not f.endswith(".time.json") and ".shards/" not in f]
    assert {"scores/taylor.json", "stages/score-taylor.json", "sweep.json", "prune.json"} <= set(compared)
    differ = [f for f in compared if (out / f).read_bytes() != (again / f).read_bytes()]
    assert differ == [], differ


def test_run_files_follow_the_umask(finished):
    """Every file and folder of a run (saved weights included: transformers writes them 0600) gets
    the modes a plain open/mkdir gives under the user's umask."""
    from attribution.core.io import current_umask

    _, out = finished
    mask = current_umask()
    wrong = [
        (str(p.relative_to(out)), oct(p.stat().st_mode & 0o777))
        for p in out.rglob("*")
        if p.name != LOCK_NAME and p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask
    ]
    assert wrong == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_models_follow_the_umask(tmp_path, mask):
    from prune.checkpoints import load_model, save_pruned

    model, tokenizer = load_model(str(tiny_model_dir(tmp_path / "world")))
    previous = os.umask(mask)
    try:
        saved = save_pruned(model, tmp_path / "out" / "model", tokenizer)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [saved, *saved.iterdir()]}
    assert modes.pop("model") == 0o777 & ~mask
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~mask}
