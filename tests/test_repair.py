"""Least-squares repair: optimal scales (vs an independent solve), never a worse reconstruction,
masked and removed models repaired alike."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.masking import head_gates, mask_heads
from prune.repair import LayerRepair, RepairResult, repair
from prune.surgery import bake_mask, remove_heads
from tests.conftest import pad_id, padded_batch, tiny_model
from tests.prune_helpers import sensitive

HEADS = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}  # layer 1 loses everything: nothing to repair there


def _setup(family: str = "bert", seed: int = 0):
    model = sensitive(tiny_model(family, seed=seed), seed=seed)
    pad = pad_id(model)
    batches = [padded_batch(batch=4, length=9, seed=s, pad_id=pad) for s in range(10, 13)]
    return model, batches


def _projection_output(model, layer, batch):
    """The output projection's output ``[B, T, D]`` of ``layer`` (a full forward pass, plain hook)."""
    seen = {}
    handle = instrument.output_projection(model, layer).register_forward_hook(
        lambda module, args, out: seen.setdefault("out", out.detach())
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen["out"]


def _error(model, dense, layer, batches):
    """Measured reconstruction error of ``layer``'s attention output (MSE per element, valid tokens)."""
    total, count = 0.0, 0
    for batch in batches:
        valid = batch["attention_mask"].bool()
        diff = _projection_output(model, layer, batch)[valid] - _projection_output(dense, layer, batch)[valid]
        total += float(diff.double().square().sum())
        count += diff.numel()
    return total / count


def _independent_scales(model, dense, layer, batches):
    """Scales by a different route: each surviving head's contribution is measured by running the
    model with one-hot probe gates (output minus bias), stacked, and solved with one big lstsq."""
    kept = instrument.kept_heads(model)[layer]
    gate = head_gates(model)[layer]
    active = [p for p in range(len(kept)) if gate[p] != 0]
    bias = instrument.output_projection(model, layer).bias.detach()
    columns, targets = [], []
    for batch in batches:
        valid = batch["attention_mask"].bool()
        per_head = []
        for p in active:
            one_hot = torch.zeros(len(kept))
            one_hot[p] = 1.0
            with instrument.AttentionProbe(model) as probe:
                probe.gates[layer] = one_hot / torch.where(gate == 0, torch.ones_like(gate), gate)
                per_head.append((_projection_output(model, layer, batch) - bias)[valid].flatten())
        columns.append(torch.stack(per_head, dim=1))
        targets.append((_projection_output(dense, layer, batch) - bias)[valid].flatten())
    design, target = torch.cat(columns).double(), torch.cat(targets).double()
    return torch.linalg.lstsq(design, target[:, None]).solution[:, 0]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_masked_repair_is_the_least_squares_optimum_and_never_worse(family):
    model, batches = _setup(family)
    dense = copy.deepcopy(model)
    mask_heads(model, HEADS)
    result = repair(model, batches, progress=False)
    assert [r.layer for r in result.layers] == [0, 2]
    assert all(r.applied_as == "gates" for r in result.layers)
    for record in result.layers:
        layer = record.layer
        assert record.heads == [h for h in range(4) if h not in HEADS[layer]]
        # the reported errors are the measured ones, and repair did not make them worse
        after = _error(model, dense, layer, batches)
        gates = head_gates(model)
        undone = [g.clone() for g in gates]
        undone[layer] = (undone[layer] != 0).float()  # this layer unrepaired, everything below as is
        instrument.set_head_mask(model, undone)
        before = _error(model, dense, layer, batches)
        expected = _independent_scales(model, dense, layer, batches)
        instrument.set_head_mask(model, gates)
        assert record.error_after == pytest.approx(after, rel=1e-4)
        assert record.error_before == pytest.approx(before, rel=1e-4)
        assert after <= before + 1e-12
        assert after < before  # random heads: strictly better here
        torch.testing.assert_close(torch.tensor(record.scales, dtype=torch.float64), expected, atol=1e-4, rtol=1e-4)


def test_removed_model_repairs_like_the_masked_one(tmp_path):
    model, batches = _setup("bert", seed=1)
    dense = copy.deepcopy(model)
    masked = copy.deepcopy(model)
    mask_heads(masked, HEADS)
    masked_result = repair(masked, batches, progress=False)
    removed = copy.deepcopy(model)
    remove_heads(removed, HEADS)
    with pytest.raises(HeadpruneError, match="pass the dense model"):
        repair(removed, batches, progress=False)
    removed_result = repair(removed, batches, dense=dense, progress=False)
    assert all(r.applied_as == "weights" for r in removed_result.layers)
    assert instrument.get_head_mask(removed) == [None, None, None]  # folded, still on the fast path
    for a, b in zip(masked_result.layers, removed_result.layers, strict=True):
        assert a.heads == b.heads
        torch.testing.assert_close(torch.tensor(a.scales), torch.tensor(b.scales), atol=1e-5, rtol=1e-5)
    probe_batch = padded_batch(batch=3, length=8, seed=99)
    expected = masked(**probe_batch).logits
    torch.testing.assert_close(removed(**probe_batch).logits, expected, atol=1e-4, rtol=0)
    bake_mask(masked)  # gates (scales) folded into weights
    torch.testing.assert_close(masked(**probe_batch).logits, expected, atol=1e-4, rtol=0)
    assert RepairResult.load(removed_result.save(tmp_path / "repair.json")) == removed_result


def test_metric_is_reported_before_and_after():
    model, batches = _setup("bert")
    mask_heads(model, {0: [0, 1], 2: [3]})
    calls = []

    def metric(m):
        calls.append(head_gates(m)[0].tolist())
        return {"accuracy": float(len(calls))}

    result = repair(model, batches, metric_fn=metric, progress=False)
    assert result.metric_before == {"accuracy": 1.0} and result.metric_after == {"accuracy": 2.0}
    assert calls[0][:2] == [0.0, 0.0] and calls[0][2:] == [1.0, 1.0]  # before: unscaled
    assert calls[1][2:] == pytest.approx(result.layers[0].scales)  # after: the repair scales
    assert "accuracy: 1.0000 -> 2.0000" in result.summary()


def test_repair_on_a_dense_model_does_nothing_and_bad_input():
    model, batches = _setup("bert")
    before = [p.clone() for p in model.parameters()]
    assert repair(model, batches, progress=False).layers == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(HeadpruneError, match="at least one calibration batch"):
        repair(model, [], progress=False)
    with pytest.raises(HeadpruneError, match="tokenizer batch"):
        repair(model, [{"ids": torch.zeros(1, 2)}], progress=False)


def _repair_result() -> RepairResult:
    layer = LayerRepair(
        layer=2, heads=[0, 3], scales=[0.9, 1.25], error_before=0.5, error_after=0.25, target_energy=2.0,
        applied_as="gates",
    )
    return RepairResult(
        layers=[layer], examples=4, tokens=20, seconds=0.1, metric_before={"accuracy": 0.5},
        metric_after={"accuracy": 0.75}, options={"ridge": 0.0, "scales": "per head"},
    )


def test_repair_result_record_round_trip_and_keys(tmp_path):
    result = _repair_result()
    data = result.to_dict()
    assert data["format"] == "headprune.RepairResult" and data["version"] == 1
    assert set(data) - {"format", "version"} == {f.name for f in dataclasses.fields(RepairResult)} - {"seconds"}
    assert data["layers"] == [dataclasses.asdict(result.layers[0])]  # nested layers: plain, no tag
    # the time is kept in memory, not in the file: the same repair writes the same bytes
    slower = dataclasses.replace(result, seconds=result.seconds + 7.5)
    assert slower == result and slower.to_dict() == data
    assert RepairResult.from_dict(data) == result
    path = result.save(tmp_path / "repair.json")
    again = RepairResult.load(path)
    assert again == result and isinstance(again.layers[0], LayerRepair)
    # files of the earlier hand-written layout (no version key, a "seconds" key) still load
    path.write_text(json.dumps({**dataclasses.asdict(result), "format": "headprune.RepairResult"}))
    assert "seconds" in json.loads(path.read_text())
    assert RepairResult.load(path) == result


def test_repair_result_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "repair.json"
    path.write_text('{"format": "headprune.RepairResult", "layers": [')
    with pytest.raises(HeadpruneError) as info:
        RepairResult.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    data = _repair_result().to_dict()
    del data["layers"][0]["scales"]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=r"missing key 'scales'") as info:
        RepairResult.load(path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({"format": "headprune.CostReport", "version": 1}))
    with pytest.raises(HeadpruneError, match="expected a headprune.RepairResult file"):
        RepairResult.load(path)
    with pytest.raises(HeadpruneError, match="not found"):
        RepairResult.load(tmp_path / "absent.json")
