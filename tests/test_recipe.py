"""Recipe validation: malformed recipes fail with one line naming file, line, key and expectation,
exit status 2, and nothing written; valid recipes fill defaults and accept --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from prune.cli import main
from prune.recipe import RecipeError, describe_schema, load_recipe, parse_recipe

GOOD = """\
model: default
data:
  name: tweets
score:
  examples: 20
  criteria:
    attattr: {n_steps: 4, integration: gausslegendre}
    taylor: {}
sweep:
  fractions: [0.25, 0.5]
prune:
  criterion: attattr
  target: {max_drop: 0.01}
"""

# (name, recipe text, substrings the one-line error must contain)
MALFORMED = [
    ("missing model", "data:\n  name: tweets\n", ["line 1", "missing required key 'model'"]),
    (
        "unknown criterion",
        "model: default\nscore:\n  criteria:\n    attattr: {}\n    saliency: {}\n",
        ["line 5", "score.criteria.saliency", "unknown criterion 'saliency'", "attattr, taylor"],
    ),
    (
        "fraction 1.5",
        "model: default\nsweep:\n  fractions:\n    - 0.5\n    - 1.5\n",
        ["line 5", "sweep.fractions[1]", "got 1.5", "strictly between 0 and 1"],
    ),
    (
        "wrong type: integer",
        "model: default\nscore:\n  examples: twenty\n",
        ["line 3", "score.examples", "got 'twenty'", "a positive integer"],
    ),
    ("wrong type: boolean", "model: default\nexport:\n  onnx: maybe\n", ["line 3", "export.onnx", "true or false"]),
    ("unknown key", "model: default\nsweeep:\n  fractions: [0.5]\n", ["line 2", "sweeep: unknown key", "sweep"]),
    (
        "missing data column",
        "model: default\ndata:\n  name: DATA\n  text_column: tweet\n",
        ["line 4", "data.text_column", "column 'tweet' not in data.csv", "text, label"],
    ),
    (
        "unknown criterion option",
        "model: default\nscore:\n  criteria:\n    attattr:\n      steps: 4\n",
        ["line 5", "score.criteria.attattr.steps", "unknown option of attattr", "n_steps"],
    ),
    (
        "two pruning targets",
        "model: default\nprune:\n  target:\n    fraction: 0.5\n    keep_per_layer: 4\n",
        ["line 4", "prune.target", "exactly one of fraction, keep_per_layer, max_drop"],
    ),
    (
        "unknown split",
        "model: default\nevaluate:\n  split: dev\n",
        ["line 3", "evaluate.split", "train, validation, test"],
    ),
    (
        "unscored final criterion",
        "model: default\nscore:\n  criteria: [taylor]\nprune:\n  criterion: attattr\n",
        ["line 5", "prune.criterion", "'attattr' is not scored"],
    ),
    ("zero examples", "model: default\nscore:\n  examples: 0\n", ["line 3", "score.examples", "got 0"]),
    ("invalid YAML", "model: default\nsweep:\n  fractions: [0.5, 0.6\n", ["invalid YAML"]),
    ("duplicate key", "model: default\nseed: 1\nseed: 2\n", ["line 3", "seed: duplicate key (first on line 2)"]),
    (
        "unknown integration method",
        "model: default\nscore:\n  criteria:\n    attattr: {integration: simpson}\n",
        ["line 4", "score.criteria.attattr.integration", "got 'simpson'", "one of: riemann_right", "gausslegendre"],
    ),
    (
        "renamed criterion option",
        "model: default\nscore:\n  criteria:\n    attattr: {method: gausslegendre}\n",
        ["line 4", "score.criteria.attattr.method", "renamed to integration", "integration: one of: riemann_right"],
    ),
    (
        "criterion option out of range",
        "model: default\nscore:\n  criteria:\n    attattr:\n      n_steps: 0\n",
        ["line 5", "score.criteria.attattr.n_steps", "got 0", "a positive integer"],
    ),
    (
        "criterion options inconsistent",
        "model: default\nscore:\n  criteria:\n    attattr:\n      integration: riemann_trapezoid\n      n_steps: 1\n",
        ["line 6", "score.criteria.attattr.n_steps", "got 1", "an integer >= 2 for riemann_trapezoid"],
    ),
    (
        "criterion option of the wrong type",
        "model: default\nscore:\n  criteria:\n    taylor: {normalize: maybe}\n",
        ["line 4", "score.criteria.taylor.normalize", "got 'maybe'", "true or false"],
    ),
]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("name,text,expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, command, name, text, expected):
    data = tmp_path / "data.csv"
    data.write_text("text,label\nhello there,pos\nnot good,neg\n")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text.replace("DATA", str(data)))
    out = tmp_path / "out"
    argv = [command, str(recipe)] + (["--out", str(out)] if command == "run" else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"headprune: error: {recipe}")
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()


def test_set_overrides_are_validated_and_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--set", "sweep.fractions=[0.5, 2]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(--set sweep.fractions)" in err and "sweep.fractions[1]: got 2" in err and not out.exists()
    assert main(["validate", str(recipe), "--set", "score.nonsense=1"]) == 2
    assert "score.nonsense: unknown key" in capsys.readouterr().err
    assert main(["validate", str(recipe), "--set", "novalue"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err


def test_valid_recipe_fills_defaults_and_applies_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(path, ["score.examples=50", "repair=true", "finetune.lr=5e-5", "sweep.fractions=[0.3]"])
    assert recipe.score.examples == 50 and recipe.score.batch_size == 8  # default kept
    assert recipe.score.criteria == {"attattr": {"n_steps": 4, "integration": "gausslegendre"}, "taylor": {}}
    assert recipe.repair is not None and recipe.repair.examples == 256
    assert recipe.finetune.lr == 5e-5 and isinstance(recipe.finetune.lr, float)  # YAML 1.1 reads 5e-5 as text
    assert recipe.sweep.fractions == [0.3]
    assert recipe.prune.target.max_drop == 0.01 and recipe.prune.target.fraction is None
    # the resolved recipe round-trips through YAML to the same object
    again = parse_recipe(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()
    # optional sections can be switched off
    off = parse_recipe("model: default\nsweep: null\nprune: null\nexport: false\n")
    assert off.sweep is None and off.prune is None and off.export is None


def test_list_of_criteria_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("text,label\na,x\n")
    (tmp_path / "sub" / "r.yaml").write_text(
        "model: default\ndata: {name: d.csv}\nscore:\n  criteria: [fisher, random]\n"
    )
    recipe = load_recipe(tmp_path / "sub" / "r.yaml")
    assert recipe.data.name == str((tmp_path / "sub" / "d.csv").resolve())
    assert recipe.score.criteria == {"fisher": {}, "random": {}}


def test_validate_prints_the_plan_and_schema(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "score     attattr (n_steps=4, integration=gausslegendre)" in out
    assert "largest swept fraction within 0.01 of dense" in out
    assert main(["validate", "--schema"]) == 0
    schema = capsys.readouterr().out
    assert schema == describe_schema() + "\n"
    assert "shard_size: 50" in schema and "max_drop: null" in schema


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


RECIPES = Path(__file__).parent.parent / "recipes"


def test_every_shipped_recipe_is_checked():
    shipped = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert shipped == sorted([*PRUNING_RECIPES, "analysis-tweets", "tweets-minilm-compress"])


PRUNING_RECIPES = [
    "tweets-minilm", "tweets-minilm-multiprocess", "quick-minilm", "tweets-mpnet", "bert-base-mnli", "bert-base-sst2",
]


@pytest.mark.parametrize("name", PRUNING_RECIPES)
def test_shipped_pruning_recipes_are_valid(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.prune is not None and recipe.sweep is not None
    assert recipe.score is not None and "attattr" in recipe.score.criteria


def test_shipped_analysis_recipe_is_valid(capsys):
    recipe = load_recipe(RECIPES / "analysis-tweets.yaml")
    assert recipe.score is None and recipe.prune is None and recipe.sweep is None
    assert recipe.analysis.tree is not None and recipe.analysis.tree.texts
    assert recipe.analysis.triggers is not None and recipe.analysis.triggers.attack
    # and the CLI's summary of it names both analysis stages
    assert main(["validate", str(RECIPES / "analysis-tweets.yaml")]) == 0
    out = capsys.readouterr().out
    assert "attribution tree(s)" in out and "triggers from" in out


def test_shipped_compress_recipe_is_valid():
    recipe = load_recipe(RECIPES / "tweets-minilm-compress.yaml")
    assert recipe.score is None and recipe.prune is None and recipe.export is None
    assert recipe.compress is not None and recipe.compress.target.latency == 0.4
    assert recipe.heal is not None and recipe.heal.budget == "10m"
    assert recipe.quantize is not None and recipe.quantize.per_channel


def test_validate_names_the_compression_stages(capsys):
    assert main(["validate", str(RECIPES / "tweets-minilm-compress.yaml")]) == 0
    out = capsys.readouterr().out
    assert "compress  heads + neurons by fisher" in out and "heal      distillation" in out and "quantize" in out
