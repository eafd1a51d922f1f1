"""The stage runner: a tiny recipe end to end, reruns that skip, resumable attribution shards,
and several processes giving what one gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attribution.importance import head_importance
from attribution.scores import HeadScores
from prune.cli import main
from prune.masking import mask_heads
from prune.metrics import compute_metrics
from prune.recipe import load_recipe
from prune.stages import Pipeline, StageRecord, run_recipe
from prune.strategies import select_heads
from prune.surgery import load_pruned
from tests.tiny_recipe import tiny_recipe

CRITERIA = ["attattr", "taylor", "fisher", "attention", "random"]
EVERY_FILE = [
    "recipe.yaml",
    "command.txt",
    "dense.json",
    *[f"scores/{c}.json" for c in CRITERIA],
    "sweep.json",
    "prune.json",
    "repair.json",
    "model/config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
    "cost.json",
    "export.json",
    "onnx/model.onnx",
    "onnx/dense.onnx",
    "report.md",
    "report.html",
    "figures/heatmaps.png",
    "figures/curves.png",
]
STAGES = ["dense", *[f"score-{c}" for c in CRITERIA], "sweep", "prune", "cost", "export", "report"]

SCORE_ONLY = {"sweep": "sweep: null\n", "prune": "prune: null\n", "repair": "", "cost": "", "export": "export: null\n"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One end-to-end run of the tiny recipe (shared by the tests that only read its outputs)."""
    tmp = tmp_path_factory.mktemp("full")
    recipe = tiny_recipe(tmp)
    out = tmp / "out"
    lines: list[str] = []
    result = run_recipe(load_recipe(recipe), out, progress=False, command="headprune run tiny", log=lines.append)
    return recipe, out, result, lines


def test_tiny_recipe_produces_every_output(full_run):
    _, out, result, _ = full_run
    assert result.ran == STAGES and result.skipped == []
    missing = [f for f in EVERY_FILE if not (out / f).is_file()]
    assert not missing
    for stage in STAGES:
        assert StageRecord.load(out / "stages" / f"{stage}.json").name == stage
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and 'src="figures' not in html  # self-contained
    md = (out / "report.md").read_text()
    for needle in ["![head-importance heatmaps](figures/heatmaps.png)", "heads kept per layer", "load_pruned(", "ONNX"]:
        assert needle in md


def test_rerun_skips_every_stage_and_touches_nothing(full_run):
    recipe, out, _, _ = full_run
    stamps = {f: (out / f).stat().st_mtime_ns for f in EVERY_FILE}
    lines: list[str] = []
    result = run_recipe(load_recipe(recipe), out, progress=False, command="headprune run tiny", log=lines.append)
    assert result.ran == [] and result.skipped == STAGES
    assert sum("already done" in line and "skipped" in line for line in lines) == len(STAGES)
    assert {f: (out / f).stat().st_mtime_ns for f in EVERY_FILE if f not in ("recipe.yaml", "command.txt")} == {
        f: t for f, t in stamps.items() if f not in ("recipe.yaml", "command.txt")
    }


def test_outputs_agree_with_independent_computations(full_run):
    recipe_path, out, _, _ = full_run
    pipeline = Pipeline(load_recipe(recipe_path), out, progress=False)
    pipeline._model_path = str(load_recipe(recipe_path).model)
    dense, tokenizer = pipeline.dense
    prune = json.loads((out / "prune.json").read_text())
    # the saved model reloads with the recorded heads and gives the recorded test metrics
    model, _ = load_pruned(out / "model")
    kept = json.loads((out / "model" / "config.json").read_text())["headprune_kept_heads"]
    assert kept == prune["kept"] and [len(k) for k in kept] == prune["kept_per_layer"]
    test = pipeline.rows("evaluate")
    with torch.no_grad():
        batch = tokenizer(list(test["text"]), padding=True, truncation=True, max_length=16, return_tensors="pt")
        logits = model(**batch).logits
    final = prune["metrics"].get("repaired", prune["metrics"]["pruned"])
    assert compute_metrics(logits, torch.tensor(list(test["label"])), ["accuracy"])["accuracy"] == final["accuracy"]
    # a sweep point equals the *masked* dense model's accuracy on the sweep rows (removal == masking)
    sweep = json.loads((out / "sweep.json").read_text())
    rows = pipeline.rows("sweep")
    point = sweep["curves"]["taylor"][1]
    heads = select_heads(HeadScores.load(out / "scores" / "taylor.json"), sparsity=point["fraction"])
    with mask_heads(dense, heads), torch.no_grad():
        batch = tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=16, return_tensors="pt")
        masked = dense(**batch).logits
    assert compute_metrics(masked, torch.tensor(list(rows["label"])), ["accuracy"])["accuracy"] == point["metric"]
    # sweep rows never overlap scored rows taken from the same split
    assert set(pipeline.rows("score")["text"]) != set() and pipeline.recipe.score.split != pipeline.recipe.sweep.split


def test_changed_section_reruns_only_downstream_stages(full_run, tmp_path):
    recipe, out, _, _ = full_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    lines: list[str] = []
    result = run_recipe(
        load_recipe(recipe, ["sweep.fractions=[0.5]"]), copy, progress=False, command="x", log=lines.append
    )
    assert result.skipped == ["dense", *[f"score-{c}" for c in CRITERIA]]
    assert result.ran == ["sweep", "prune", "cost", "export", "report"]
    assert any("[sweep] running (inputs changed: sweep.fractions" in line for line in lines)
    assert json.loads((copy / "sweep.json").read_text())["fractions"] == [0.5]


def test_report_ignores_files_left_by_another_recipe(full_run, tmp_path):
    recipe, out, _, _ = full_run
    reused = tmp_path / "out"
    shutil.copytree(out, reused)
    overrides = ["score.criteria=[taylor]", "sweep=null", "prune=null", "repair=null", "export=null"]
    result = run_recipe(load_recipe(recipe, overrides), reused, progress=False, log=lambda line: None)
    assert result.ran == ["report"]  # dense and taylor's scores are still valid
    md = (reused / "report.md").read_text()
    assert "taylor" in md and "attattr" not in md and "Pruning curves" not in md and "Dense model" in md
    assert (reused / "sweep.json").exists()  # left alone, just not reported


def test_interrupted_attribution_resumes_from_the_last_shard(tmp_path):
    recipe_path = tiny_recipe(tmp_path, **SCORE_ONLY)
    overrides = [
        "score.examples=20",
        "score.shard_size=4",
        "score.criteria={attattr: {n_steps: 3, method: gausslegendre}}",
    ]
    recipe = load_recipe(recipe_path, overrides)
    out = tmp_path / "out"

    def crash_after_two(criterion: str, shard: int) -> None:
        if shard == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(recipe, out, progress=False, on_shard=crash_after_two, log=lambda line: None)
    shards = sorted(p.name for p in (out / "scores" / "attattr.shards").glob("shard-*.pt"))
    assert shards == ["shard-00000.pt", "shard-00001.pt"]
    assert not (out / "scores" / "attattr.json").exists() and not (out / "stages" / "score-attattr.json").exists()

    computed: list[int] = []
    lines: list[str] = []
    result = run_recipe(recipe, out, progress=False, on_shard=lambda c, k: computed.append(k), log=lines.append)
    assert computed == [2, 3, 4] and "score-attattr" in result.ran
    assert any("resuming: 2 of 5 shards already done" in line for line in lines)
    resumed = HeadScores.load(out / "scores" / "attattr.json")
    record = StageRecord.load(out / "stages" / "score-attattr.json")
    assert record.outputs["shards_reused"] == 2 and record.outputs["shards_computed"] == 3

    # identical to an uninterrupted run, bit for bit
    fresh = run_recipe(recipe, tmp_path / "fresh", progress=False, log=lambda line: None)
    assert fresh.ran[:2] == ["dense", "score-attattr"]
    uninterrupted = HeadScores.load(tmp_path / "fresh" / "scores" / "attattr.json")
    assert torch.equal(resumed.values, uninterrupted.values)
    assert resumed.provenance["examples"] == 20

    # and equal to attribution.head_importance over the same rows in one go (independent reduction;
    # batches are composed differently, so float32 rounding differs)
    pipeline = Pipeline(recipe, out, progress=False)
    pipeline._model_path = recipe.model
    model, _ = pipeline.dense
    batches = list(pipeline.batches(pipeline.rows("score"), 4))
    direct = head_importance(model, batches, "attattr", progress=False, n_steps=3, method="gausslegendre")
    torch.testing.assert_close(resumed.values, direct.values, rtol=1e-6, atol=0)


def test_bad_data_fails_before_anything_is_written(tmp_path, capsys):
    # a .json data file cannot be checked statically: the missing column shows when the data loads,
    # which happens before the output directory is created
    rows = [{"text": f"good day {i}", "label": "pos"} for i in range(20)]
    rows += [{"text": f"bad day {i}", "label": "neg"} for i in range(20)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    recipe = tiny_recipe(tmp_path, **SCORE_ONLY, data=f"data:\n  name: {data}\n  label_column: sentiment\n")
    out = tmp_path / "out"
    capsys.readouterr()  # forget the tiny model's save messages
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label column 'sentiment' not in data set" in err[0]
    assert not out.exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_two_processes_give_the_scores_and_metrics_of_one(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        score=(
            "score:\n  split: train\n  examples: 10\n  batch_size: 4\n  shard_size: 3\n  criteria:\n"
            "    attattr: {n_steps: 2, method: gausslegendre}\n    fisher: {}\n"
        ),
        sweep="sweep:\n  fractions: [0.25, 0.5]\n  split: validation\n  batch_size: 8\n",
        prune="prune:\n  criterion: fisher\n  target: {fraction: 0.5}\n",
        repair="",
        cost="cost: null\n",
        export="export: null\n",
    )
    one = tmp_path / "one"
    run_recipe(load_recipe(recipe), one, progress=False, log=lambda line: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    two = tmp_path / "two"
    command = ["torchrun", "--nproc_per_node", "2", "-m", "prune.cli", "run", str(recipe), "--out", str(two), "--quiet"]
    done = subprocess.run(
        command, env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for criterion in ("attattr", "fisher"):
        a = HeadScores.load(one / "scores" / f"{criterion}.json").values
        b = HeadScores.load(two / "scores" / f"{criterion}.json").values
        assert torch.equal(a, b), criterion
    # shards were dealt round-robin: 4 shards of 10 rows, each computed once
    assert len(list((two / "scores" / "attattr.shards").glob("shard-*.pt"))) == 4
    assert json.loads((one / "sweep.json").read_text()) == json.loads((two / "sweep.json").read_text())
    assert (
        json.loads((one / "prune.json").read_text())["metrics"]
        == json.loads((two / "prune.json").read_text())["metrics"]
    )
