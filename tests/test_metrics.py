"""prune.metrics against hand-computed values and scikit-learn (in the test extra)."""

from __future__ import annotations

import dataclasses
import json
import math

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
