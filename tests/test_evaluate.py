"""Re-evaluation (metrics, result files) and the ``headprune evaluate`` / ``headprune prune`` commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from attribution import instrument
from attribution.core import processes
from attribution.core.errors import HeadpruneError
from attribution.core.predict import predict_logits as predict
from attribution.scores import HeadScores
from prune.checkpoints import load_model, save_pruned
from prune.cli import main
from prune.evaluate import EvalResult, evaluate
from prune.masking import mask_heads
from prune.metrics import accuracy, macro_f1
from prune.workflow import REPORT_NAME, PruneReport
from tests.conftest import tiny_model
from tests.prune_helpers import sensitive, tiny_dataset, tiny_tokenizer
from tests.test_metrics import write_metric


@pytest.fixture
def tokenizer(tmp_path):
    return tiny_tokenizer(tmp_path / "tok")


@pytest.fixture
def model():
    return sensitive(tiny_model("bert", seed=4), seed=4)


def test_predict_matches_one_row_at_a_time(model, tokenizer):
    data = tiny_dataset(11, seed=1)
    logits = predict(model, tokenizer, data, batch_size=4)  # length-sorted, padded batches
    assert logits.shape == (11, 3)
    for row in range(11):
        alone = tokenizer(data[row]["text"], return_tensors="pt")
        torch.testing.assert_close(logits[row], model(**alone).logits[0], atol=1e-5, rtol=0)


def test_evaluate_metrics_equal_direct_computation(model, tokenizer, tmp_path):
    data = tiny_dataset(23, seed=2)
    result = evaluate(model, tokenizer, data, metrics=("accuracy", "macro_f1", "mcc"), batch_size=5, split="x")
    manual = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in data["text"]]).argmax(1)
    labels = list(data["label"])
    assert result.examples == 23 and result.processes == 1 and result.split == "x"
    assert result.metrics["accuracy"] == pytest.approx(accuracy(manual, labels))
    assert result.metrics["macro_f1"] == pytest.approx(macro_f1(manual, labels))
    assert set(result.metrics) == {"accuracy", "macro_f1", "mcc"}
    assert EvalResult.load(result.save(tmp_path / "eval.json")) == result


def test_masked_and_saved_pruned_models_evaluate_alike(model, tokenizer, tmp_path):
    data = tiny_dataset(17, seed=3)
    heads = {0: [0, 1], 2: [1, 2, 3]}
    with mask_heads(model, heads):
        masked = evaluate(model, tokenizer, data).metrics
        expected_logits = predict(model, tokenizer, data)
    path = save_pruned(model, tmp_path / "p", tokenizer)  # dense copy: heads unmasked again
    loaded, loaded_tok = load_model(path)
    assert instrument.heads_per_layer(loaded) == [4, 4, 4]
    with mask_heads(model, heads):
        path = save_pruned(model, tmp_path / "p2", tokenizer)
    loaded, loaded_tok = load_model(path)
    assert instrument.heads_per_layer(loaded) == [2, 4, 1]
    torch.testing.assert_close(predict(loaded, loaded_tok, data), expected_logits, atol=1e-5, rtol=0)
    assert evaluate(loaded, loaded_tok, data).metrics == masked


def test_evaluate_bad_input(model, tokenizer):
    data = tiny_dataset(5)
    with pytest.raises(HeadpruneError, match="unknown metric 'no_such_metric_hp13'"):
        evaluate(model, tokenizer, data, metrics=["accuracy", "no_such_metric_hp13"])
    with pytest.raises(HeadpruneError, match="no 'label' column"):
        evaluate(model, tokenizer, data.remove_columns("label"))
    with pytest.raises(HeadpruneError, match="empty"):
        evaluate(model, tokenizer, data.select([]))


# --------------------------------------------------------------------------------------------
# command line


@pytest.fixture
def workspace(tmp_path, model, tokenizer):
    """A saved tiny dense model with its tokenizer, a CSV data set and a scores file for it."""
    model_dir = save_pruned(model, tmp_path / "dense", tokenizer)
    data = tiny_dataset(80, seed=5)
    csv_path = tmp_path / "data.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data["text"], data["label"], strict=True))
    scores = HeadScores(torch.arange(12.0).reshape(3, 4).flip(1), "synthetic")  # head 3 worst in each layer
    scores_path = scores.save(tmp_path / "scores.json")
    return {"model": str(model_dir), "data": str(csv_path), "scores": str(scores_path), "tmp": tmp_path}


def test_cli_evaluate(workspace, capsys):
    out = workspace["tmp"] / "result.json"
    code = main(["evaluate", "--model", workspace["model"], "--data", workspace["data"], "--split", "test",
                 "--metrics", "accuracy,macro_f1", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    result = EvalResult.load(out)
    assert result.examples == 8 and result.split == "test"  # 10% of 80 rows carved out as test
    assert f"accuracy: {result.metrics['accuracy']:.4f}" in printed


def test_cli_evaluate_with_a_local_evaluate_metric(workspace, capsys):
    script = write_metric(workspace["tmp"] / "metrics", "error_rate")
    out = workspace["tmp"] / "result.json"
    code = main(["evaluate", "--model", workspace["model"], "--data", workspace["data"], "--metrics",
                 f"accuracy,{script},mcc", "--out", str(out), "--quiet"])
    assert code == 0
    result = EvalResult.load(out)
    assert list(result.metrics) == ["accuracy", str(script), "mcc"]
    assert result.metrics[str(script)] == pytest.approx(1 - result.metrics["accuracy"])
    assert f"{script}: {result.metrics[str(script)]:.4f}" in capsys.readouterr().out


def test_cli_evaluate_unknown_metric_is_one_line_exit_2(workspace, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = workspace["tmp"] / "never.json"
    code = main(["evaluate", "--model", workspace["model"], "--data", workspace["data"], "--metrics",
                 "accuracy,no_such_metric_hp13c", "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown metric 'no_such_metric_hp13c'" in err and "accuracy, macro_f1" in err
    assert "need network" in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.fixture
def renamed_splits(workspace):
    """A saved DatasetDict whose held-out split is called validation_matched (as in GLUE MNLI)."""
    import datasets

    parts = {"train": tiny_dataset(40, seed=7), "validation_matched": tiny_dataset(9, seed=8)}
    path = workspace["tmp"] / "mnli_like"
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return str(path), parts["validation_matched"]


def test_cli_evaluate_split_map(workspace, renamed_splits, model, tokenizer):
    path, matched = renamed_splits
    out = workspace["tmp"] / "mapped.json"
    args = ["evaluate", "--model", workspace["model"], "--data", path, "--split", "validation", "--quiet"]
    assert main([*args, "--split-map", "validation=validation_matched", "--out", str(out)]) == 0
    mapped = EvalResult.load(out)
    assert mapped.examples == 9  # the whole named split, not rows carved from train
    assert mapped.metrics == evaluate(model, tokenizer, matched).metrics
    assert main([*args, "--out", str(out)]) == 0
    assert EvalResult.load(out).examples == 4  # without the mapping: 10% of the 40 training rows


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("validation", "--split-map 'validation': expected SPLIT=SOURCE"),
        ("valid=validation_matched", "'valid' is not a split headprune uses (train, validation, test)"),
        ("validation=validation_matched,validation=train", "'validation' is mapped twice"),
        ("validation=matched", "no split 'matched' (splits: train, validation_matched)"),
    ],
)
def test_cli_bad_split_map_is_one_line_exit_2(workspace, renamed_splits, capsys, mapping, message):
    out = workspace["tmp"] / "never.json"
    code = main(["evaluate", "--model", workspace["model"], "--data", renamed_splits[0], "--split-map", mapping,
                 "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headprune: error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["attribute", "evaluate", "faithfulness", "finetune", "heal", "prune", "triggers"])
def test_every_command_that_reads_data_takes_split_map(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    shown = capsys.readouterr().out
    assert all(option in shown for option in ("--data", "--split-map SPLIT=SOURCE", "--text-column", "--label-column"))


def _evaluate_worker(out_dir: str, script: str) -> None:
    from accelerate import PartialState

    PartialState._reset_state()  # forked from the test process: forget its single-process state
    result = _evaluate_with_script(out_dir, script)
    Path(out_dir, f"rank{processes.process_index()}.json").write_text(json.dumps(result))


def _evaluate_with_script(out_dir: str, script: str) -> dict:
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer(Path(out_dir) / "tok")
    model = sensitive(tiny_model("bert", seed=4), seed=4)
    result = evaluate(model, tokenizer, tiny_dataset(13, seed=6), metrics=("accuracy", script), batch_size=4)
    return {"metrics": result.metrics, "examples": result.examples, "processes": result.processes}


def test_two_processes_give_one_result_with_an_evaluate_metric(tmp_path):
    from accelerate import PartialState, debug_launcher

    script = str(write_metric(tmp_path / "metrics", "error_rate"))
    debug_launcher(_evaluate_worker, args=(str(tmp_path), script), num_processes=2)
    PartialState._reset_state()
    single = _evaluate_with_script(str(tmp_path), script)
    assert single["processes"] == 1 and single["examples"] == 13
    for rank in (0, 1):
        multi = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert multi["processes"] == 2 and multi["examples"] == 13  # every row once, gathered
        assert multi["metrics"] == single["metrics"]
    assert single["metrics"][script] == pytest.approx(1 - single["metrics"]["accuracy"])


def test_cli_prune_sparsity_with_repair_and_evaluation(workspace, capsys):
    out = workspace["tmp"] / "pruned"
    code = main(["prune", "--model", workspace["model"], "--scores", workspace["scores"], "--sparsity", "0.5",
                 "--repair", "--evaluate", "--data", workspace["data"], "--calibration-examples", "16",
                 "--eval-examples", "8", "--out", str(out), "--quiet"])
    assert code == 0
    report = PruneReport.load(out / REPORT_NAME)
    # values descend along each row after flip: head 3 of every layer is lowest, then head 2 ...
    # the 6 lowest overall are layer 0's heads 3, 2, 1, 0 and layer 1's heads 3, 2
    assert report.removed == {0: [0, 1, 2, 3], 1: [2, 3]}
    assert report.heads_after == 6 and set(report.metrics) == {"dense", "pruned", "repaired"}
    assert report.repair is not None and [r["layer"] for r in report.repair["layers"]] == [1]
    loaded, _ = load_model(out)
    assert instrument.kept_heads(loaded) == [[], [0, 1], [0, 1, 2, 3]]
    assert "removed 6 heads" in capsys.readouterr().out


def test_cli_prune_keep_per_layer_on_a_pruned_model(workspace):
    first = workspace["tmp"] / "first"
    assert main(["prune", "--model", workspace["model"], "--scores", workspace["scores"], "--count", "2",
                 "--out", str(first), "--quiet"]) == 0
    second = workspace["tmp"] / "second"
    assert main(["prune", "--model", str(first), "--scores", workspace["scores"], "--keep-per-layer", "1",
                 "--out", str(second), "--quiet"]) == 0
    # count 2 removed (0, 3), (0, 2); keep-per-layer 1 then keeps the best present head of each layer
    assert json.loads((second / "config.json").read_text())["headprune_kept_heads"] == [[0], [0], [0]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.5"], "sparsity must be a fraction strictly between 0 and 1"),
        (["--sparsity", "0"], "sparsity must be a fraction strictly between 0 and 1"),
        (["--keep-per-layer", "9"], "keep-per-layer must be an integer in 1..4"),
        (["--count", "2", "--metric", "no_such_metric_hp13"], "unknown metric 'no_such_metric_hp13'"),
        (["--count", "2", "--scores", "OTHER"], "2 layers x 4 heads, but this model has 3 x 4"),
        (["--count", "2", "--scores", "MISSING"], "scores file not found"),
    ],
)
def test_cli_prune_bad_input_is_one_line(workspace, capsys, extra, message):
    other = HeadScores(torch.zeros(2, 4), "x").save(workspace["tmp"] / "other.json")
    args = ["prune", "--model", workspace["model"], "--scores", workspace["scores"], "--out",
            str(workspace["tmp"] / "never"), "--quiet", *extra]
    args = [str(other) if a == "OTHER" else str(workspace["tmp"] / "nope.json") if a == "MISSING" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headprune: error: ") and message in err and "\n" not in err
    assert not (workspace["tmp"] / "never").exists()


def test_cli_prune_iterative(workspace, capsys):
    scores = HeadScores(torch.rand(3, 4, generator=torch.Generator().manual_seed(0)), "attention",
                        {"options": {}})
    scores_path = scores.save(workspace["tmp"] / "attention.json")
    out = workspace["tmp"] / "iterative"
    code = main(["prune", "--model", workspace["model"], "--scores", str(scores_path), "--iterative",
                 "--tolerance", "0.5", "--step", "0.25", "--data", workspace["data"], "--eval-examples", "8",
                 "--score-examples", "8", "--out", str(out), "--quiet"])
    assert code == 0
    report = PruneReport.load(out / REPORT_NAME)
    history = report.iterative["history"]
    accepted = [r for r in history if r["accepted"]]
    assert accepted and {int(k): v for k, v in accepted[-1]["heads"].items()} == report.removed
    # 25% of 12 heads per round, never the last head
    assert all(r["pruned"] == min(3 * (i + 1), 11) for i, r in enumerate(history))
    assert report.metrics["pruned"]["accuracy"] >= report.metrics["dense"]["accuracy"] * 0.5
    loaded, _ = load_model(out)
    assert sum(instrument.heads_per_layer(loaded)) == 12 - len(sum(report.removed.values(), []))
    assert "iterative:" in capsys.readouterr().out
