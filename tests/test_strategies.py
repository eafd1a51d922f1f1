"""Choosing heads from scores: hand-computed selections, constraints, iterative pruning, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.scores import HeadScores
from prune.masking import masked_heads
from prune.strategies import (
    IterationRecord,
    IterativeResult,
    check_scores,
    iterative_pruning,
    select_global,
    select_heads,
    select_per_layer,
)
from tests.conftest import tiny_model

# 3 layers x 4 heads; ascending order of the values: (1,0) (0,2) (1,1) (2,3) (0,0) (1,3) (2,0) ...
VALUES = [
    [0.50, 0.90, 0.20, 0.80],
    [0.10, 0.30, 0.95, 0.55],
    [0.60, 0.85, 0.70, 0.40],
]


@pytest.fixture
def scores():
    return HeadScores(torch.tensor(VALUES), "hand")


def test_global_by_fraction_and_count(scores):
    # 12 heads, sparsity 0.5 -> the 6 lowest: .10 .20 .30 .40 .50 .55
    assert select_global(scores, sparsity=0.5) == {0: [0, 2], 1: [0, 1, 3], 2: [3]}
    assert select_global(scores, count=3) == {0: [2], 1: [0, 1]}
    assert select_heads(scores, sparsity=0.25) == select_global(scores, count=3)


def test_global_respects_min_per_layer(scores):
    # layer 1 may lose only 2 heads (.10 .30); .55 is skipped and the next lowest (.60) taken
    assert select_global(scores, sparsity=0.5, min_per_layer=2) == {0: [0, 2], 1: [0, 1], 2: [0, 3]}
    with pytest.raises(HeadpruneError, match="keeping 3 per layer"):
        select_global(scores, count=4, min_per_layer=3)


def test_global_counts_absent_heads_towards_sparsity(scores):
    present = [[0, 1, 2, 3], [1, 2, 3], [0, 1, 2]]  # (1,0) and (2,3) are already gone
    # sparsity 0.5 = 6 heads gone in total; 2 already are, so 4 more: .20 .30 .50 .55
    assert select_global(scores, sparsity=0.5, present=present) == {0: [0, 2], 1: [1, 3]}
    with pytest.raises(HeadpruneError, match="nothing to prune"):
        select_global(scores, sparsity=0.1, present=present)


def test_ties_are_broken_by_position():
    tied = HeadScores(torch.zeros(2, 3), "flat")
    assert select_global(tied, count=4) == {0: [0, 1, 2], 1: [0]}
    assert select_per_layer(tied, 1) == {0: [1, 2], 1: [1, 2]}


def test_keep_per_layer(scores):
    assert select_per_layer(scores, 2) == {0: [0, 2], 1: [0, 1], 2: [0, 3]}
    assert select_heads(scores, keep_per_layer=3) == {0: [2], 1: [0], 2: [3]}
    # min_per_layer raises the number kept
    assert select_heads(scores, keep_per_layer=1, min_per_layer=3) == {0: [2], 1: [0], 2: [3]}
    # heads already absent are neither re-chosen nor counted as kept
    assert select_per_layer(scores, 2, present=[[0, 1], [0, 1, 2, 3], [1]]) == {1: [0, 1]}
    with pytest.raises(HeadpruneError, match="prunes nothing"):
        select_per_layer(scores, 4)


@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.2, float("nan"), True, "0.5"])
def test_sparsity_outside_open_interval_is_refused(scores, sparsity):
    with pytest.raises(HeadpruneError, match="strictly between 0 and 1") as error:
        select_global(scores, sparsity=sparsity)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"count": 12}, "at least one must remain"),
        ({"count": 0}, "positive integer"),
        ({"sparsity": 0.99}, "at least one must remain"),
        ({}, "exactly one"),
        ({"sparsity": 0.5, "count": 2}, "exactly one"),
        ({"count": 2, "min_per_layer": 5}, "min_per_layer must be an integer in 0..4"),
    ],
)
def test_bad_selection_arguments(scores, kwargs, message):
    with pytest.raises(HeadpruneError, match=message):
        select_global(scores, **kwargs)


def test_bad_keep_per_layer_and_mixed_options(scores):
    for keep in (0, 5, -1):
        with pytest.raises(HeadpruneError, match=r"keep-per-layer must be an integer in 1\.\.4"):
            select_per_layer(scores, keep)
    with pytest.raises(HeadpruneError, match="exactly one of sparsity, count or keep_per_layer"):
        select_heads(scores, sparsity=0.5, keep_per_layer=2)


def test_scores_for_another_model_shape_are_refused():
    model = tiny_model("bert")  # 3 x 4
    with pytest.raises(HeadpruneError, match="2 layers x 4 heads, but this model has 3 x 4") as error:
        check_scores(HeadScores(torch.zeros(2, 4), "x"), model)
    assert "\n" not in str(error.value)
    with pytest.raises(HeadpruneError, match="NaN"):
        check_scores(HeadScores(torch.full((3, 4), float("nan")), "x"), model)
    check_scores(HeadScores(torch.zeros(3, 4), "x"), model)


def test_iterative_pruning_recomputes_scores_and_stops_below_tolerance(tmp_path):
    model = tiny_model("bert")
    seen_masks = []
    # Scores: head h of layer l is worth (l + 1) * 10 + h, except that once layer 0 lost any head,
    # layer 2's heads become the least important: a change only visible if scores are recomputed.
    def score_fn(m):
        masked = masked_heads(m)
        seen_masks.append(masked)
        values = torch.tensor([[(layer + 1) * 10.0 + h for h in range(4)] for layer in range(3)])
        if masked.get(0):
            values[2] -= 100
        return HeadScores(values, "synthetic")

    # Metric: 1.0 minus 0.01 per masked head; tolerance 0.035 -> at most 3 heads may go.
    def metric_fn(m):
        return 1.0 - 0.01 * sum(len(v) for v in masked_heads(m).values())

    result = iterative_pruning(model, score_fn, metric_fn, step=1 / 12, tolerance=0.035, progress=False)
    assert result.dense_metric == 1.0 and result.threshold == pytest.approx(0.965)
    # round 1 takes (0,0); with layer 0 touched, rounds 2 and 3 take (2,0), (2,1); round 4 is rejected
    assert [r.heads for r in result.history] == [
        {0: [0]}, {0: [0], 2: [0]}, {0: [0], 2: [0, 1]}, {0: [0], 2: [0, 1, 2]}
    ]
    assert [r.accepted for r in result.history] == [True, True, True, False]
    assert result.heads == {0: [0], 2: [0, 1]}
    assert result.final_metric == pytest.approx(0.97)
    assert seen_masks == [{}, {0: [0]}, {0: [0], 2: [0]}, {0: [0], 2: [0, 1]}]
    assert "fell below" in result.stopped_because
    assert instrument.get_head_mask(model) == [None, None, None]  # model left as it was
    assert model.config._attn_implementation == "sdpa"
    again = IterativeResult.load(result.save(tmp_path / "iterative.json"))
    assert again == result


def test_iterative_pruning_stops_when_nothing_can_go():
    model = tiny_model("bert", layers=2, heads=2)
    result = iterative_pruning(
        model,
        lambda m: HeadScores(torch.rand(2, 2, generator=torch.Generator().manual_seed(0)), "r"),
        lambda m: 1.0,
        step=0.25,
        tolerance=0.0,
        min_per_layer=1,
        progress=False,
    )
    assert sum(len(v) for v in result.heads.values()) == 2
    assert all(len(v) == 1 for v in result.heads.values())
    assert "no head can be pruned" in result.stopped_because


@pytest.mark.parametrize("kwargs", [{"step": 0}, {"step": 1.0}, {"tolerance": 1.0}, {"tolerance": -0.1}])
def test_iterative_bad_arguments(kwargs):
    with pytest.raises(HeadpruneError):
        iterative_pruning(tiny_model("bert"), lambda m: None, lambda m: 1.0, progress=False, **kwargs)


def _iterative_result() -> IterativeResult:
    history = [
        IterationRecord(1, 1, 1 / 12, 0.99, True, {0: [0]}),
        IterationRecord(2, 2, 2 / 12, 0.90, False, {0: [0], 2: [1]}),
    ]
    return IterativeResult(
        heads={0: [0]}, dense_metric=1.0, final_metric=0.99, tolerance=0.05, threshold=0.95, step=0.1,
        history=history, stopped_because="metric fell below",
    )


def test_iterative_result_record_round_trip_and_keys(tmp_path):
    result = _iterative_result()
    data = result.to_dict()
    assert data["format"] == "headprune.IterativeResult" and data["version"] == 1
    assert set(data) - {"format", "version"} == {f.name for f in dataclasses.fields(IterativeResult)}
    # layer keys are strings in the dict, as in the JSON file; integers again when loaded
    assert data["heads"] == {"0": [0]} and data["history"][1]["heads"] == {"0": [0], "2": [1]}
    assert set(data["history"][0]) == {f.name for f in dataclasses.fields(IterationRecord)}
    assert IterativeResult.from_dict(data) == result
    path = result.save(tmp_path / "iterative.json")
    again = IterativeResult.load(path)
    assert again == result and isinstance(again.history[0], IterationRecord)
    assert again.history[1].heads == {0: [0], 2: [1]}
    path.write_text(json.dumps({**dataclasses.asdict(result), "format": "headprune.IterativeResult"}))
    assert IterativeResult.load(path) == result  # earlier layout, no version key


def test_iterative_result_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "iterative.json"
    path.write_text('{"format": "headprune.IterativeResult", "heads": {')
    with pytest.raises(HeadpruneError) as info:
        IterativeResult.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    data = _iterative_result().to_dict()
    data["history"][0]["surprise"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=r"unknown key 'surprise'") as info:
        IterativeResult.load(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(HeadpruneError, match="expected a headprune.IterativeResult file"):
        IterativeResult.load(path)
