"""The stage runner: a tiny recipe end to end, reruns that skip, resumable attribution shards,
and several processes giving what one gives."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attribution.core.errors import HeadpruneError
from attribution.criteria import head_importance
from attribution.scores import HeadScores
from prune.checkpoints import load_model
from prune.cli import main
from prune.masking import mask_heads
from prune.metrics import compute_metrics
from prune.pipeline import run_recipe
from prune.pipeline.artifacts import PruneRun, StageRecord
from prune.pipeline.context import RunContext
from prune.recipe import load_recipe
from prune.strategies import select_heads
from prune.workflow import SweepResult
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
    "onnx/config.json",
    "onnx/tokenizer.json",
    "onnx-dense/model.onnx",
    "report.md",
    "report.html",
    "figures/heatmaps.png",
    "figures/curves.png",
]
STAGES = ["dense", *[f"score-{c}" for c in CRITERIA], "sweep", "prune", "cost", "export", "report"]

@contextlib.contextmanager
def logged() -> Iterator[list[str]]:
    """The messages logged to headprune's logger inside the block."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("headprune")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def context(recipe, out) -> RunContext:
    """A run's context on a finished run, for independent checks of its outputs."""
    ctx = RunContext(recipe, out, progress=False)
    ctx.model_path = str(recipe.model)
    return ctx


SCORE_ONLY = {"sweep": "sweep: null\n", "prune": "prune: null\n", "repair": "", "cost": "", "export": "export: null\n"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One end-to-end run of the tiny recipe (shared by the tests that only read its outputs)."""
    tmp = tmp_path_factory.mktemp("full")
    recipe = tiny_recipe(tmp)
    out = tmp / "out"
    with logged() as lines:
        result = run_recipe(load_recipe(recipe), out, progress=False, command="headprune run tiny")
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
    for needle in ["![head-importance heatmaps](figures/heatmaps.png)", "heads kept per layer", "load_model(", "ONNX"]:
        assert needle in md


def test_rerun_skips_every_stage_and_touches_nothing(full_run):
    recipe, out, _, _ = full_run
    stamps = {f: (out / f).stat().st_mtime_ns for f in EVERY_FILE}
    with logged() as lines:
        result = run_recipe(load_recipe(recipe), out, progress=False, command="headprune run tiny")
    assert result.ran == [] and result.skipped == STAGES
    assert sum("already done" in line and "skipped" in line for line in lines) == len(STAGES)
    assert {f: (out / f).stat().st_mtime_ns for f in EVERY_FILE if f not in ("recipe.yaml", "command.txt")} == {
        f: t for f, t in stamps.items() if f not in ("recipe.yaml", "command.txt")
    }


def test_outputs_agree_with_independent_computations(full_run):
    recipe_path, out, _, _ = full_run
    ctx = context(load_recipe(recipe_path), out)
    dense, tokenizer = ctx.dense
    prune = PruneRun.load(out / "prune.json")
    # the saved model reloads with the recorded heads and gives the recorded test metrics
    model, _ = load_model(str(out / "model"))
    kept = json.loads((out / "model" / "config.json").read_text())["headprune_kept_heads"]
    assert kept == prune.kept and [len(k) for k in kept] == prune.kept_per_layer
    test = ctx.rows("evaluate")
    with torch.no_grad():
        batch = tokenizer(list(test["text"]), padding=True, truncation=True, max_length=16, return_tensors="pt")
        logits = model(**batch).logits
    final = prune.final_metrics
    assert compute_metrics(logits, torch.tensor(list(test["label"])), ["accuracy"])["accuracy"] == final["accuracy"]
    # a sweep point equals the *masked* dense model's accuracy on the sweep rows (removal == masking)
    sweep = SweepResult.load(out / "sweep.json")
    rows = ctx.rows("sweep")
    point = sweep.curves["taylor"][1]
    heads = select_heads(HeadScores.load(out / "scores" / "taylor.json"), sparsity=point.fraction)
    with mask_heads(dense, heads), torch.no_grad():
        batch = tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=16, return_tensors="pt")
        masked = dense(**batch).logits
    assert compute_metrics(masked, torch.tensor(list(rows["label"])), ["accuracy"])["accuracy"] == point.metric


def test_sweep_rows_never_overlap_scored_rows_of_the_same_split(tmp_path):
    recipe = load_recipe(
        tiny_recipe(tmp_path, **SCORE_ONLY),
        ["score.split=validation", "score.examples=5", "sweep={split: validation, examples: 7}"],
    )
    ctx = context(recipe, tmp_path / "out")
    split = ctx.splits["validation"]
    # tag every row with its position: texts of the tiny data set may repeat
    ctx.__dict__["splits"] = {**ctx.splits, "validation": split.add_column("row", list(range(len(split))))}
    scored, swept = set(ctx.rows("score")["row"]), set(ctx.rows("sweep")["row"])
    assert len(scored) == 5 and len(swept) == 7 and not scored & swept
    # with no rows left after the scored ones, it says so instead of reusing them
    ctx.recipe.score.examples = len(split)
    with pytest.raises(HeadpruneError, match="no validation rows left for sweep"):
        ctx.rows("sweep")


def test_changed_section_reruns_only_downstream_stages(full_run, tmp_path):
    recipe, out, _, _ = full_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    with logged() as lines:
        result = run_recipe(load_recipe(recipe, ["sweep.fractions=[0.5]"]), copy, progress=False, command="x")
    assert result.skipped == ["dense", *[f"score-{c}" for c in CRITERIA]]
    assert result.ran == ["sweep", "prune", "cost", "export", "report"]
    assert any("[sweep] running (inputs changed: sweep.fractions" in line for line in lines)
    assert json.loads((copy / "sweep.json").read_text())["fractions"] == [0.5]


def test_report_ignores_files_left_by_another_recipe(full_run, tmp_path):
    recipe, out, _, _ = full_run
    reused = tmp_path / "out"
    shutil.copytree(out, reused)
    overrides = ["score.criteria=[taylor]", "sweep=null", "prune=null", "repair=null", "export=null"]
    result = run_recipe(load_recipe(recipe, overrides), reused, progress=False)
    assert result.ran == ["report"]  # dense and taylor's scores are still valid
    md = (reused / "report.md").read_text()
    assert "taylor" in md and "attattr" not in md and "Pruning curves" not in md and "Dense model" in md
    assert (reused / "sweep.json").exists()  # left alone, just not reported


def test_interrupted_attribution_resumes_from_the_last_shard(tmp_path):
    recipe_path = tiny_recipe(tmp_path, **SCORE_ONLY)
    overrides = [
        "score.examples=20",
        "score.shard_size=4",
        "score.criteria={attattr: {n_steps: 3, integration: gausslegendre}}",
    ]
    recipe = load_recipe(recipe_path, overrides)
    out = tmp_path / "out"

    def crash_after_two(criterion: str, shard: int) -> None:
        if shard == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(recipe, out, progress=False, on_shard=crash_after_two)
    shards = sorted(p.name for p in (out / "scores" / "attattr.shards").glob("shard-*.pt"))
    assert shards == ["shard-00000.pt", "shard-00001.pt"]
    assert not (out / "scores" / "attattr.json").exists() and not (out / "stages" / "score-attattr.json").exists()

    computed: list[int] = []
    with logged() as lines:
        result = run_recipe(recipe, out, progress=False, on_shard=lambda c, k: computed.append(k))
    assert computed == [2, 3, 4] and "score-attattr" in result.ran
    assert any("resuming: 2 of 5 shards already done" in line for line in lines)
    resumed = HeadScores.load(out / "scores" / "attattr.json")
    record = StageRecord.load(out / "stages" / "score-attattr.json")
    assert record.outputs["shards_reused"] == 2 and record.outputs["shards_computed"] == 3

    # identical to an uninterrupted run, bit for bit
    fresh = run_recipe(recipe, tmp_path / "fresh", progress=False)
    assert fresh.ran[:2] == ["dense", "score-attattr"]
    uninterrupted = HeadScores.load(tmp_path / "fresh" / "scores" / "attattr.json")
    assert torch.equal(resumed.values, uninterrupted.values)
    assert resumed.provenance["examples"] == 20

    # and equal to attribution.head_importance over the same rows in one go (independent reduction;
    # batches are composed differently, so float32 rounding differs)
    ctx = context(recipe, out)
    model, _ = ctx.dense
    batches = list(ctx.batches(ctx.rows("score"), 4))
    direct = head_importance(model, batches, "attattr", progress=False, n_steps=3, integration="gausslegendre")
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
            "    attattr: {n_steps: 2, integration: gausslegendre}\n    fisher: {}\n"
        ),
        sweep="sweep:\n  fractions: [0.25, 0.5]\n  split: validation\n  batch_size: 8\n",
        prune="prune:\n  criterion: fisher\n  target: {fraction: 0.5}\n",
        repair="",
        cost="cost: null\n",
        export="export: null\n",
    )
    one = tmp_path / "one"
    run_recipe(load_recipe(recipe), one, progress=False)
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
    assert PruneRun.load(one / "prune.json").metrics == PruneRun.load(two / "prune.json").metrics
