"""The recipe's ``analysis:`` section: attribution trees and trigger mining as resumable stages,
in an analysis-only recipe (no scoring or pruning), checked against direct calls of the library's
entry points (``write_tree``, ``run_triggers``); reruns skip; malformed sections (renamed keys too)
give the one-line error with exit 2."""

from __future__ import annotations

import json

import pytest

from attribution.core.data import DataSpec, load_splits
from attribution.tree import AttributionTree
from attribution.tree_render import write_tree
from attribution.triggers import TriggerReport, run_triggers
from prune.checkpoints import load_model
from prune.cli import main
from prune.pipeline import run_recipe
from prune.pipeline.artifacts import StageRecord
from prune.recipe import RecipeError, load_recipe
from tests.tiny_recipe import tiny_recipe

TEXTS = ["really good food and great service", "the day was awful"]
FORMATS = ["png", "html", "txt", "json"]
ANALYSIS = (
    "analysis:\n"
    "  tree:\n"
    f"    texts: {json.dumps(TEXTS)}\n"
    "    tau: 0.3\n    n_steps: 3\n    integration: gausslegendre\n"
    f"    formats: {json.dumps(FORMATS)}\n"
    "  triggers:\n"
    "    split: train\n    examples: 16\n    n_steps: 3\n    integration: gausslegendre\n    batch_size: 4\n"
    "    attack: true\n    top_k: 2\n    attack_split: validation\n    attack_examples: 10\n    random_trials: 2\n"
)
# analysis only: every pruning section off (the dense evaluation and the report still run)
ANALYSIS_ONLY = {
    "score": "score: null\n",
    "sweep": "sweep: null\n",
    "prune": "prune: null\n",
    "repair": "",
    "cost": "cost: null\n",
    "export": "export: null\n",
    "analysis": ANALYSIS,
}
STAGES = ["dense", "analysis-tree", "analysis-triggers", "report"]
FILES = [
    *[f"analysis/trees/tree-{i}.{fmt}" for i in range(len(TEXTS)) for fmt in FORMATS],
    "analysis/triggers.json",
]


def _no_provenance(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "provenance"}


def _rounded(value):  # noqa: ANN001, ANN202 - JSON data
    """JSON data with floats rounded (the runner's deep-copied model may differ in the last bits)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


@pytest.fixture(scope="module")
def analysis_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    recipe = tiny_recipe(tmp, **ANALYSIS_ONLY)
    out = tmp / "out"
    result = run_recipe(load_recipe(recipe), out, progress=False)
    return recipe, out, result


def test_analysis_only_recipe_writes_trees_and_triggers(analysis_run):
    recipe, out, result = analysis_run
    assert result.ran == STAGES and result.skipped == []
    assert not (out / "scores").exists() and not (out / "sweep.json").exists()
    missing = [f for f in FILES if not (out / f).is_file()]
    assert not missing
    assert not list((out / "analysis").rglob(".tmp-*"))  # temporary names renamed away
    assert StageRecord.load(out / "stages" / "analysis-tree.json").files == [f for f in FILES if "trees" in f]
    assert (out / "analysis/trees/tree-0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Analysis" in report and all(f"`{f}`" in report for f in FILES)

    # the same trees and report as direct calls of the library's entry points with the section's options
    loaded = load_recipe(recipe)
    model, tokenizer = load_model(loaded.model)
    for i, text in enumerate(TEXTS):
        direct = write_tree(model, tokenizer, text, [], tau=0.3, n_steps=3, integration="gausslegendre", max_length=16)
        saved = AttributionTree.load(out / f"analysis/trees/tree-{i}.json")
        assert _rounded(_no_provenance(saved.to_dict())) == _rounded(_no_provenance(direct.to_dict()))
        assert (out / f"analysis/trees/tree-{i}.txt").read_text().strip() == direct.to_text().strip()
    splits = load_splits(DataSpec(**loaded.section("data")))
    direct = run_triggers(
        model, tokenizer, splits, out / "direct.json", split="train", examples=16, attack=True,
        attack_split="validation", attack_examples=10, top_k=2, random_trials=2, max_length=16, seed=0,
        progress=False, n_steps=3, integration="gausslegendre", batch_size=4,
    )
    saved = TriggerReport.load(out / "analysis/triggers.json")
    assert saved.label_names == ["neg", "pos"]
    assert len(tokenizer) == 31 and tokenizer.unk_token_id not in tokenizer("good day")["input_ids"]
    assert saved.class_attacks  # the attack ran
    assert _rounded(_no_provenance(saved.to_dict())) == _rounded(_no_provenance(direct.to_dict()))


def test_rerun_skips_the_analysis_stages(analysis_run):
    recipe, out, _ = analysis_run
    stamps = {f: (out / f).stat().st_mtime_ns for f in FILES}
    result = run_recipe(load_recipe(recipe), out, progress=False)
    assert result.ran == [] and result.skipped == STAGES
    assert {f: (out / f).stat().st_mtime_ns for f in FILES} == stamps
    # a changed tree option reruns the tree stage only (and the report that lists every stage)
    changed = run_recipe(load_recipe(recipe, ["analysis.tree.tau=0.5"]), out, progress=False)
    assert changed.ran == ["analysis-tree", "report"]
    assert AttributionTree.load(out / "analysis/trees/tree-0.json").tau == 0.5


@pytest.mark.parametrize(
    ("block", "line", "needle"),
    [
        ("analysis:\n  tree:\n    texts: [good day]\n    tau: 1.5\n", 4, "analysis.tree.tau: got 1.5; expected"),
        ("analysis:\n  tree:\n    texts: [good day]\n    colour: red\n", 4, "analysis.tree.colour: unknown key"),
        ("analysis:\n  triggers:\n    split: train\n    examples: 0\n", 4, "analysis.triggers.examples: got 0;"),
        ("analysis:\n  triggers: {integration: simpson}\n", 2,
         "analysis.triggers.integration: unknown integration method"),
        ("analysis:\n  tree:\n    texts: [a]\n    n_steps: 1\n    integration: riemann_trapezoid\n", 4,
         "analysis.tree.n_steps: got 1; expected an integer >= 2 for riemann_trapezoid"),
        ("analysis:\n  tree:\n    texts: [a]\n    steps: 4\n", 4,
         "analysis.tree.steps: renamed to n_steps; expected n_steps: a positive integer"),
        ("analysis:\n  triggers:\n    split: train\n    method: gausslegendre\n", 4,
         "analysis.triggers.method: renamed to integration; expected integration: an integration method name"),
        ("analysis:\n  tree:\n    texts: []\n", 3, "analysis.tree.texts: got an empty list"),
        ("analysis:\n  tree:\n    texts: [a]\n    formats: [gif]\n", 4, "analysis.tree.formats[0]: unknown format"),
        ("analysis:\n  tree:\n    texts: [a, b]\n    text_pairs: [c]\n", 4, "analysis.tree.text_pairs: got 1 for 2"),
        ("analysis: {}\n", 1, "analysis: neither tree nor triggers"),
    ],
)
def test_malformed_analysis_section_is_one_line_exit_2(tmp_path, capsys, block, line, needle):
    recipe = tiny_recipe(tmp_path, **{**ANALYSIS_ONLY, "model": "model: minilm\n", "data": "", "analysis": block})
    text = recipe.read_text()
    line += text[: text.index("analysis:")].count("\n")  # the block's lines, counted in the whole file
    with pytest.raises(RecipeError):
        load_recipe(recipe)
    capsys.readouterr()  # forget the tiny model's save messages
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"headprune: error: {recipe}: line {line}: {needle}"), err
    assert not (tmp_path / "out").exists()


def test_sweep_without_score_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path, **{**ANALYSIS_ONLY, "model": "model: minilm\n", "data": "", "sweep": ""})
    with pytest.raises(RecipeError, match="sweep needs the score section"):
        load_recipe(recipe)
