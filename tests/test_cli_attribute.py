"""``headprune attribute`` end to end on a tiny saved model and a csv, and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from attribution import HeadScores
from prune.cli import main
from tests.tiny_recipe import tiny_csv, tiny_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_model_dir(root / "m"), tiny_csv(root / "data.csv", rows=60)


@pytest.mark.parametrize("criterion", ["attattr", "taylor", "fisher", "attention", "random"])
def test_attribute_writes_scores_and_plot(world, tmp_path, criterion, capsys):
    model, data = world
    out, png = tmp_path / "scores.json", tmp_path / "heads.png"
    code = main(
        [
            "attribute",
            "--model",
            str(model),
            "--data",
            str(data),
            "--criterion",
            criterion,
            "--examples",
            "7",
            "--split",
            "train",
            *(["--n-steps", "3"] if criterion == "attattr" else []),
            "--batch-size",
            "3",
            "--out",
            str(out),
            "--plot",
            str(png),
            "--quiet",
        ]
    )
    assert code == 0
    scores = HeadScores.load(out)
    assert scores.shape == (2, 4) and scores.criterion == criterion and torch.isfinite(scores.values).all()
    assert scores.provenance["examples"] == (0 if criterion == "random" else 7)
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "top heads" in printed
    if criterion == "attattr":
        assert scores.provenance["options"] == {
            "n_steps": 3,
            "integration": "riemann_right",
            "output": "probability",
            "target": "predicted",
        }
        assert "completeness error" in printed


def test_attribute_matches_python_api(world, tmp_path):
    """The CLI's batching (length-sorted) changes nothing: same scores as one call on all examples."""
    from attribution import head_importance
    from attribution.core.data import iter_batches, load_splits
    from prune.checkpoints import load_model

    model_dir, data = world
    out = tmp_path / "scores.json"
    main(
        [
            "attribute",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--examples",
            "6",
            "--n-steps",
            "4",
            "--integration",
            "gausslegendre",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    model, tokenizer = load_model(model_dir)
    split = load_splits(str(data))["validation"].select(range(6))
    batch = next(iter_batches(split, tokenizer, batch_size=6))
    batch.pop("index")
    expected = head_importance(model, [batch], "attattr", n_steps=4, integration="gausslegendre", progress=False)
    torch.testing.assert_close(HeadScores.load(out).values, expected.values, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--examples", "0"], "--examples must be at least 1"),
        (["--criterion", "magic"], "unknown criterion 'magic'"),
        (["--n-steps", "0"], "attattr option n_steps: got 0; expected a positive integer"),
        (["--n-steps", "three"], "attattr option n_steps: got 'three'; expected a positive integer"),
        (["--integration", "simpson"], "attattr option integration: got 'simpson'; expected one of: riemann_right"),
        (["--seed", "3"], "--seed: criterion 'attattr' takes no option seed; its options: n_steps, integration"),
        (["--criterion", "taylor", "--n-steps", "3"], "'taylor' takes no option n_steps; its options: normalize"),
        (["--option", "method=gausslegendre"], "attattr option method was renamed to integration"),
        (["--option", "n_steps"], "--option expects KEY=VALUE, got 'n_steps'"),
        (["--n-steps", "3", "--option", "n_steps=4"], "n_steps given twice"),
        (["--model", "/nonexistent/model"], "model directory not found"),
    ],
)
def test_bad_input_is_one_line_error_with_exit_2(world, tmp_path, extra, message, capsys):
    model, data = world
    args = ["attribute", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "s.json"), "--quiet"]
    code = main(args + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("headprune: error:") and message in err and "\n" not in err
    assert not (tmp_path / "s.json").exists()


def test_attribute_scores_a_pruned_checkpoint(world, tmp_path):
    """Removed heads score exactly 0 and the rest match the masked model's scores."""
    from prune import load_model, mask_heads, remove_heads, save_pruned

    model_dir, data = world
    model, tokenizer = load_model(model_dir)
    heads = {0: [1, 3], 1: [0]}
    remove_heads(model, heads)
    save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)
    args = [
        "attribute",
        "--data",
        str(data),
        "--criterion",
        "taylor",
        "--no-normalize",
        "--examples",
        "6",
        "--split",
        "train",
        "--quiet",
    ]
    assert main([*args, "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "pruned.json")]) == 0
    pruned = HeadScores.load(tmp_path / "pruned.json").values
    assert pruned[0, [1, 3]].abs().sum() == 0 and pruned[1, 0] == 0
    dense, _ = load_model(model_dir)
    with mask_heads(dense, heads):
        from attribution import head_importance
        from attribution.core.data import iter_batches, load_splits

        split = load_splits(str(data))["train"].select(range(6))
        batch = next(iter_batches(split, tokenizer, batch_size=6))
        batch.pop("index")
        masked = head_importance(dense, [batch], "taylor", normalize=False, progress=False).values
    torch.testing.assert_close(pruned, masked, atol=1e-6, rtol=1e-4)


def test_a_plugin_criterion_gets_its_options_from_the_command_line(world, tmp_path, capsys):
    """A criterion registered after the CLI exists: no flag of its own, ``--option KEY=VALUE`` for
    each option, parsed by the criterion's own option types; its diagnostics are printed."""
    from attribution.criteria import CRITERIA, Criterion, CriterionOption, register_criterion

    @register_criterion
    class Constant(Criterion):
        name = "test_constant"
        OPTIONS = (
            CriterionOption("value", 1.0, float, "every head's score"),
            CriterionOption("negate", False, bool, "flip the sign"),
            CriterionOption("batch_size", 1, int, "an option named like a CLI flag"),
        )

        def per_example(self, model, batch):
            value = -self.settings["value"] if self.settings["negate"] else self.settings["value"]
            return torch.full((batch["input_ids"].shape[0], 2, 4), value, dtype=torch.float64)

        def take_diagnostics(self):
            return {"calls": torch.ones(1)}

        def summarize(self, diagnostics):
            return {"constant_calls": {"total": float(diagnostics["calls"].sum())}}

    model, data = world
    out = tmp_path / "constant.json"
    base = ["attribute", "--model", str(model), "--data", str(data), "--examples", "5", "--batch-size", "2",
            "--quiet", "--criterion", "test_constant", "--out", str(out)]  # fmt: skip
    try:
        args = [*base, "--option", "value=2.5", "--option", "negate=true", "--option", "batch-size=7"]
        assert main(args) == 0
        scores = HeadScores.load(out)
        assert scores.criterion == "test_constant" and scores.values.unique().tolist() == [-2.5]
        assert scores.provenance["options"] == {"value": 2.5, "negate": True, "batch_size": 7}
        assert scores.provenance["constant_calls"] == {"total": 3.0}  # 5 examples in batches of 2
        assert "constant calls: total 3" in capsys.readouterr().out
        assert main([*base, "--option", "value=big"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "headprune: error: test_constant option value: got 'big'; expected a number"
        assert main([*base, "--n-steps", "3"]) == 2
        assert "its options: value, negate, batch_size" in capsys.readouterr().err
    finally:
        CRITERIA.pop("test_constant", None)
