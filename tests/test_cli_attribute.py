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


@pytest.mark.parametrize("method", ["attattr", "taylor", "fisher", "attention", "random"])
def test_attribute_writes_scores_and_plot(world, tmp_path, method, capsys):
    model, data = world
    out, png = tmp_path / "scores.json", tmp_path / "heads.png"
    code = main(
        [
            "attribute",
            "--model",
            str(model),
            "--data",
            str(data),
            "--method",
            method,
            "--examples",
            "7",
            "--split",
            "train",
            "--steps",
            "3",
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
    assert scores.shape == (2, 4) and scores.method == method and torch.isfinite(scores.values).all()
    assert scores.provenance["examples"] == (0 if method == "random" else 7)
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "top heads" in printed
    if method == "attattr":
        assert scores.provenance["options"] == {
            "n_steps": 3,
            "method": "riemann_right",
            "output": "probability",
            "target": "predicted",
        }
        assert "completeness error" in printed


def test_attribute_matches_python_api(world, tmp_path):
    """The CLI's batching (length-sorted) changes nothing: same scores as one call on all examples."""
    from attribution import head_importance
    from attribution.core.data import iter_batches, load_splits
    from attribution.models import load_classifier

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
            "--steps",
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
    model, tokenizer = load_classifier(model_dir)
    split = load_splits(str(data))["validation"].select(range(6))
    batch = next(iter_batches(split, tokenizer, batch_size=6))
    batch.pop("index")
    expected = head_importance(model, [batch], "attattr", n_steps=4, method="gausslegendre", progress=False)
    torch.testing.assert_close(HeadScores.load(out).values, expected.values, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--examples", "0"], "--examples must be at least 1"),
        (["--method", "magic"], "unknown head-importance method 'magic'"),
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
    from attribution.models import load_classifier
    from prune import mask_heads, remove_heads, save_pruned

    model_dir, data = world
    model, tokenizer = load_classifier(model_dir)
    heads = {0: [1, 3], 1: [0]}
    remove_heads(model, heads)
    save_pruned(model, tmp_path / "pruned", tokenizer=tokenizer)
    args = [
        "attribute",
        "--data",
        str(data),
        "--method",
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
    dense, _ = load_classifier(model_dir)
    with mask_heads(dense, heads):
        from attribution import head_importance
        from attribution.core.data import iter_batches, load_splits

        split = load_splits(str(data))["train"].select(range(6))
        batch = next(iter_batches(split, tokenizer, batch_size=6))
        batch.pop("index")
        masked = head_importance(dense, [batch], "taylor", normalize=False, progress=False).values
    torch.testing.assert_close(pruned, masked, atol=1e-6, rtol=1e-4)
