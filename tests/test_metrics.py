"""prune.metrics against hand-computed values and scikit-learn (in the test extra)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.core.errors import HeadpruneError
from prune.evaluate import EvalResult
from prune.metrics import METRICS, accuracy, compute_metrics, confusion_matrix, macro_f1, matthews_corrcoef

# 3 classes, 8 examples; confusion (rows gold, columns predicted):
#   gold 0: [2, 1, 0]   gold 1: [0, 2, 1]   gold 2: [1, 0, 1]
LABELS = [0, 0, 0, 1, 1, 1, 2, 2]
PREDS = [0, 0, 1, 1, 1, 2, 0, 2]


def test_confusion_matrix_by_hand() -> None:
    classes, counts = confusion_matrix(PREDS, LABELS)
    assert classes.tolist() == [0, 1, 2]
    assert counts.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]


def test_accuracy_by_hand() -> None:
    assert accuracy(PREDS, LABELS) == pytest.approx(5 / 8)
    assert accuracy([1, 1], [1, 1]) == 1.0


def test_macro_f1_by_hand() -> None:
    # class 0: tp 2 fp 1 fn 1 -> 4/6; class 1: tp 2 fp 1 fn 1 -> 4/6; class 2: tp 1 fp 1 fn 1 -> 2/4
    expected = (4 / 6 + 4 / 6 + 2 / 4) / 3
    assert macro_f1(PREDS, LABELS) == pytest.approx(expected)


def test_macro_f1_counts_classes_only_predicted() -> None:
    # class 2 never occurs in the labels but is predicted once: its F1 is 0 and it is averaged in
    assert macro_f1([0, 1, 2], [0, 1, 1]) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_matthews_by_hand() -> None:
    # binary: tp 2, tn 1, fp 1, fn 0 -> (2*1 - 1*0) / sqrt(3*2*2*1)
    assert matthews_corrcoef([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    # multiclass R_K: c = 5, s = 8, t = (3, 3, 2), p = (3, 3, 2)
    numerator = 5 * 8 - (9 + 9 + 4)
    denominator = math.sqrt((64 - 22) * (64 - 22))
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(numerator / denominator)


def test_matthews_degenerate_is_zero() -> None:
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 1, 0], [0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0], [0, 1]) == pytest.approx(-1.0)


def test_inputs_tensors_arrays_and_logits() -> None:
    logits = torch.zeros(len(PREDS), 3)
    logits[torch.arange(len(PREDS)), torch.tensor(PREDS)] = 1.0
    from_logits = compute_metrics(logits, torch.tensor(LABELS))
    from_ids = compute_metrics(np.array(PREDS), LABELS)
    assert from_logits == pytest.approx(from_ids)
    assert set(from_ids) == {"accuracy", "macro_f1"}


def test_compute_metrics_names_and_aliases() -> None:
    values = compute_metrics(PREDS, LABELS, names=("accuracy", "mcc", "matthews_corrcoef", "f1"))
    assert list(values) == ["accuracy", "mcc", "matthews_corrcoef", "f1"]
    assert values["mcc"] == values["matthews_corrcoef"] == pytest.approx(matthews_corrcoef(PREDS, LABELS))
    assert values["f1"] == pytest.approx(macro_f1(PREDS, LABELS))


def test_unknown_metric_lists_known_ones() -> None:
    with pytest.raises(HeadpruneError) as info:
        compute_metrics(PREDS, LABELS, names=("accuracy", "bleu"))
    message = str(info.value)
    assert "'bleu'" in message and "\n" not in message
    for name in METRICS:
        assert name in message


@pytest.mark.parametrize(
    ("preds", "labels", "fragment"),
    [([0, 1], [0], "2 predictions but 1 labels"), ([], [], "zero examples"), ([0.5, 1], [0, 1], "integers")],
)
def test_bad_inputs_raise_clear_errors(preds: list, labels: list, fragment: str) -> None:
    with pytest.raises(HeadpruneError, match=fragment):
        accuracy(preds, labels)


def test_matches_sklearn_on_random_data() -> None:
    from sklearn import metrics as sk  # in the test extra: a missing scikit-learn fails, never skips

    rng = np.random.default_rng(0)
    for trial in range(20):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(1, 200))
        labels = rng.integers(0, k, n)
        # mostly-right predictions, sometimes constant, so degenerate cases are covered too
        preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
        if trial % 7 == 0:
            preds = np.full(n, int(labels[0]))
        assert accuracy(preds, labels) == pytest.approx(sk.accuracy_score(labels, preds))
        assert macro_f1(preds, labels) == pytest.approx(sk.f1_score(labels, preds, average="macro", zero_division=0))
        assert matthews_corrcoef(preds, labels) == pytest.approx(sk.matthews_corrcoef(labels, preds), abs=1e-12)


def _eval_result() -> EvalResult:
    return EvalResult(
        metrics={"accuracy": 0.75, "macro_f1": 0.5}, examples=8, model="m", data="tweets", split="test",
        seconds=0.5, processes=2, extra={"note": "x"},
    )


def test_eval_result_record_round_trip_and_keys(tmp_path) -> None:
    result = _eval_result()
    data = result.to_dict()
    assert data == {"format": "headprune.EvalResult", "version": 1, **dataclasses.asdict(result)}
    assert EvalResult.from_dict(data) == result
    path = result.save(tmp_path / "eval.json")
    assert EvalResult.load(path) == result
    path.write_text(json.dumps({**dataclasses.asdict(result), "format": "headprune.EvalResult"}))  # no version
    assert EvalResult.load(path) == result


def test_eval_result_bad_files_are_one_line_errors_naming_the_file(tmp_path) -> None:
    path = tmp_path / "eval.json"
    path.write_text('{"format": "headprune.EvalResult", "metrics": {')
    with pytest.raises(HeadpruneError) as info:
        EvalResult.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    data = _eval_result().to_dict()
    del data["examples"]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=r"missing key 'examples'") as info:
        EvalResult.load(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({"format": "headprune.HeadScores"}))
    with pytest.raises(HeadpruneError, match="expected a headprune.EvalResult file, found a headprune.HeadScores"):
        EvalResult.load(path)


# --------------------------------------------------------------------------------------------
# metrics loaded with Hugging Face evaluate (local scripts; the hub is unreachable here)

# A metric that evaluate loads from a local script: the fraction of wrong predictions.
ERROR_RATE_SCRIPT = '''
import datasets
import evaluate


class ErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="fraction of wrong predictions", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        wrong = sum(int(p != r) for p, r in zip(predictions, references))
        return {"error_rate": wrong / len(references), "note": "wrong / all"}
'''


def write_metric(folder: Path, name: str, source: str = ERROR_RATE_SCRIPT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(source)
    return path


def test_local_evaluate_metric_script_file_and_directory(tmp_path: Path) -> None:
    script = write_metric(tmp_path, "error_rate")
    values = compute_metrics(PREDS, LABELS, ["accuracy", str(script)])
    assert list(values) == ["accuracy", str(script)]
    assert values[str(script)] == pytest.approx(3 / 8) == pytest.approx(1 - values["accuracy"])
    # evaluate's directory convention: DIR/DIR.py; from logits too
    folder = write_metric(tmp_path / "wrong", "wrong").parent
    logits = torch.nn.functional.one_hot(torch.tensor(PREDS), 3).float()
    assert compute_metrics(logits, LABELS, [str(folder)])[str(folder)] == pytest.approx(3 / 8)
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 4, 97), rng.integers(0, 4, 97)
    assert compute_metrics(preds, labels, [str(script)])[str(script)] == pytest.approx(np.mean(preds != labels))


def test_builtin_names_win_over_local_scripts_of_the_same_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    constant = ERROR_RATE_SCRIPT.replace("wrong / len(references)", "42.0")
    write_metric(tmp_path / "accuracy", "accuracy", constant)  # what evaluate.load("accuracy") would find
    write_metric(tmp_path / "errors", "errors", constant)
    values = compute_metrics(PREDS, LABELS, ["accuracy", "acc", "errors"])
    assert values == {"accuracy": 5 / 8, "acc": 5 / 8, "errors": 42.0}  # a non-built-in name is loaded


def test_unknown_metric_offline_is_one_line_without_network(monkeypatch) -> None:
    import requests

    from prune.metrics import hub_reachable

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(requests, "head", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    with pytest.raises(HeadpruneError) as info:
        compute_metrics(PREDS, LABELS, ["accuracy", "no_such_metric_hp13"])
    message = str(info.value)
    assert "'no_such_metric_hp13'" in message and "need network" in message and "\n" not in message
    assert all(name in message for name in METRICS)


def test_unreachable_hub_is_detected_quickly(monkeypatch) -> None:
    import requests

    from prune.metrics import hub_reachable

    asked = []

    def refused(url, timeout, **kwargs):
        asked.append((url, timeout))
        raise requests.ConnectionError("refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)
    monkeypatch.setattr(requests, "head", refused)
    assert hub_reachable() is False
    assert len(asked) == 1 and asked[0][1] <= 5  # one short probe, never evaluate's 100 s timeouts
    with pytest.raises(HeadpruneError, match="unreachable here"):
        compute_metrics(PREDS, LABELS, ["no_such_metric_hp13b"])


def test_hub_metric_cached_by_evaluate_loads_offline(monkeypatch) -> None:
    import shutil

    from evaluate.loading import init_dynamic_modules

    name = "headprune_cached_probe"
    folder = Path(init_dynamic_modules(), "metrics", f"evaluate-metric--{name}")
    write_metric(folder / ("0" * 64), name)  # the layout evaluate.load leaves after a hub download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert compute_metrics(PREDS, LABELS, [name]) == {name: pytest.approx(3 / 8)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("import evaluate\nraise RuntimeError('broken on purpose')\n", "evaluate could not load it"),
        # two numbers, neither named like the metric (error_rate, from the class name)
        (ERROR_RATE_SCRIPT.replace('"error_rate"', '"share"').replace('"wrong / all"', "1.0"), "expected one number"),
        (ERROR_RATE_SCRIPT.replace("wrong / len(references)", "1 / 0"), "failed on 8 examples"),
    ],
    ids=["import-error", "two-numbers", "compute-error"],
)
def test_bad_metric_scripts_are_one_line_errors(tmp_path: Path, source: str, fragment: str) -> None:
    script = write_metric(tmp_path / fragment.replace(" ", "_"), "m", source)
    with pytest.raises(HeadpruneError, match=fragment) as info:
        compute_metrics(PREDS, LABELS, [str(script)])
    assert "\n" not in str(info.value)
    with pytest.raises(HeadpruneError, match="no metric script at ./nowhere/m.py"):
        compute_metrics(PREDS, LABELS, ["./nowhere/m.py"])


def test_recipes_take_evaluate_metrics_and_reject_unknown_ones(tmp_path: Path, monkeypatch) -> None:
    from prune.recipe import RecipeError, parse_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = write_metric(tmp_path, "error_rate")
    recipe = parse_recipe(f"model: default\nevaluate:\n  metrics: [accuracy, {script}]\nsweep:\n  metric: {script}\n")
    assert recipe.evaluate.metrics == ["accuracy", str(script)] and recipe.sweep.metric == str(script)
    for text, where in [
        ("model: default\nevaluate:\n  metrics: [accuracy, no_such_metric_hp13d]\n", "line 3: evaluate.metrics[1]"),
        ("model: default\nsweep:\n  metric: no_such_metric_hp13d\n", "line 3: sweep.metric"),
    ]:
        with pytest.raises(RecipeError) as info:
            parse_recipe(text)
        message = str(info.value)
        assert where in message and "no_such_metric_hp13d" in message and "need network" in message
        assert "\n" not in message


def test_recipe_metric_scripts_are_relative_to_the_recipe(tmp_path: Path, monkeypatch) -> None:
    from prune.recipe import load_recipe

    folder = tmp_path / "project"
    script = write_metric(folder / "metrics", "error_rate")
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(
        "model: default\nevaluate:\n  metrics: [accuracy, metrics/error_rate.py]\n"
        "sweep:\n  metric: metrics/error_rate.py\n"
    )
    monkeypatch.chdir(tmp_path)  # not the recipe's directory
    recipe = load_recipe(recipe_path)
    assert recipe.evaluate.metrics == ["accuracy", str(script.resolve())]
    assert recipe.sweep.metric == str(script.resolve())
