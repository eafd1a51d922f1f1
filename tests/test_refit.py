"""Weight-level refit: the ridge least-squares optimum (vs numpy's lstsq on the augmented system),
bottom-up inputs, the held-out guard, bias-only sub-layers, heads and feed-forward neurons."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import prune.surgery
from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.masking import mask_heads
from prune.refit import RefitResult, SublayerRefit, pruned_sublayers, refit
from prune.surgery import remove_heads
from tests.conftest import pad_id, padded_batch, tiny_model
from tests.prune_helpers import sensitive

HEADS = {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]}  # layer 1 keeps no head: bias only
NEURONS = {0: list(range(0, 37, 2)), 1: list(range(5, 30)), 2: []}  # neurons kept; layer 2 keeps none


def _batches(model, seeds, batch=8):
    return [padded_batch(batch=batch, length=9, seed=s, pad_id=pad_id(model)) for s in seeds]


def _keep_neurons(model, keep: dict[int, list[int]]) -> None:
    """Slice feed-forward neurons out by hand (rows of W_1, columns of W_2), independently of the
    library's neuron surgery: refit must work from the shapes of the linear layers alone."""
    distil = model.config.model_type == "distilbert"
    for layer, kept in keep.items():
        block = instrument.encoder_layers(model)[layer]
        first, second = (block.ffn.lin1, block.ffn.lin2) if distil else (block.intermediate.dense, block.output.dense)
        index = torch.tensor(kept, dtype=torch.long)
        with warnings.catch_warnings():  # a zero-width Linear warns on init; its weights are overwritten
            warnings.simplefilter("ignore", UserWarning)
            new_first = torch.nn.Linear(first.in_features, len(kept), dtype=first.weight.dtype)
            new_second = torch.nn.Linear(len(kept), second.out_features, dtype=second.weight.dtype)
        with torch.no_grad():
            new_first.weight.copy_(first.weight[index])
            new_first.bias.copy_(first.bias[index])
            new_second.weight.copy_(second.weight[:, index])
            new_second.bias.copy_(second.bias)
        if distil:
            block.ffn.lin1, block.ffn.lin2 = new_first, new_second
        else:
            block.intermediate.dense, block.output.dense = new_first, new_second


def _pruned(family="bert", seed=0, std=0.3, neurons=True, dtype=torch.float64):
    dense = sensitive(tiny_model(family, seed=seed), seed=seed, std=std).to(dtype)
    model = copy.deepcopy(dense)
    remove_heads(model, HEADS)
    if neurons:
        _keep_neurons(model, NEURONS)
    return model, dense


def _projection(model, layer, kind):
    block = instrument.encoder_layers(model)[layer]
    if kind == "attention" and model.config.model_type == "mpnet":
        return block.attention.attn.o
    if kind == "attention":
        return block.attention.out_lin if model.config.model_type == "distilbert" else block.attention.output.dense
    return block.ffn.lin2 if model.config.model_type == "distilbert" else block.output.dense


def _norm(model, layer, kind):
    """The LayerNorm after the sub-layer, spelled out per family (not through instrument)."""
    block = instrument.encoder_layers(model)[layer]
    if model.config.model_type == "distilbert":
        return block.sa_layer_norm if kind == "attention" else block.output_layer_norm
    if model.config.model_type == "mpnet":
        return block.attention.LayerNorm if kind == "attention" else block.output.LayerNorm
    return block.attention.output.LayerNorm if kind == "attention" else block.output.LayerNorm


def _xy(model, dense, layer, kind, batches, target="stream", first_token=True):
    """X (the model's input to the projection) and Y on the fitted tokens, by plain hooks on full
    forward passes. Y is the dense projection's output (``"sublayer"``), or (``"stream"``) the dense
    LayerNorm's input minus the model's residual (its LayerNorm input minus its projection output).
    The fitted tokens are the non-padding ones, or with ``first_token`` in the last layer position 0."""
    xs, ys = [], []
    seen: dict[str, torch.Tensor] = {}

    def keep(name, value):  # a hook must return None, or it replaces the module's output
        seen.setdefault(name, value)

    for batch in batches:
        seen.clear()

        handles = [
            _projection(model, layer, kind).register_forward_hook(lambda m, a, o: keep("x", a[0])),
            _projection(model, layer, kind).register_forward_hook(lambda m, a, o: keep("model_out", o)),
            _norm(model, layer, kind).register_forward_hook(lambda m, a, o: keep("model_norm", a[0])),
            _projection(dense, layer, kind).register_forward_hook(lambda m, a, o: keep("y", o)),
            _norm(dense, layer, kind).register_forward_hook(lambda m, a, o: keep("dense_norm", a[0])),
        ]
        with torch.no_grad():
            model(**batch)
            dense(**batch)
        for handle in handles:
            handle.remove()
        valid = batch["attention_mask"].bool()
        if first_token and layer == len(instrument.encoder_layers(model)) - 1:
            valid = torch.zeros_like(valid)
            valid[:, 0] = True
        y = seen["y"] if target == "sublayer" else seen["dense_norm"] - (seen["model_norm"] - seen["model_out"])
        xs.append(seen["x"][valid].double().numpy())
        ys.append(y[valid].double().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _independent(x, y, ridge):
    """numpy lstsq on ``[[X, 1], [sqrt(lam) I, 0]] theta = [[Y], [0]]``, lam = ridge * mean diag(X^T X)."""
    n, k = x.shape
    lam = ridge * float(np.mean(np.sum(x * x, axis=0))) if k else 0.0
    a = np.vstack([np.hstack([x, np.ones((n, 1))]), np.hstack([np.sqrt(lam) * np.eye(k), np.zeros((k, 1))])])
    b = np.vstack([y, np.zeros((k, y.shape[1]))])
    theta = np.linalg.lstsq(a, b, rcond=None)[0]
    return theta[:k].T, theta[k], lam


def _relative(x, y, weight, bias, dense_bias):
    return float(np.sum((x @ weight.T + bias - y) ** 2) / np.sum((y - dense_bias) ** 2))


@pytest.mark.parametrize(
    ("family", "target", "first_token"),
    [("bert", "sublayer", False), ("distilbert", "sublayer", False), ("bert", "stream", True),
     ("distilbert", "stream", False), ("bert", "sublayer", True), ("mpnet", "stream", True)],
)
def test_refit_is_the_ridge_least_squares_solution_on_bottom_up_inputs(family, target, first_token):
    model, dense = _pruned(family)
    unrefit = copy.deepcopy(model)
    calibration = _batches(model, range(10, 14))
    result = refit(model, dense, calibration, ridge=1e-3, target=target, first_token=first_token, progress=False)
    expected = [(0, "attention"), (0, "ffn"), (1, "attention"), (1, "ffn"), (2, "attention"), (2, "ffn")]
    assert [(r.layer, r.kind) for r in result.sublayers] == expected
    assert [r.units for r in result.sublayers] == [2, 19, 0, 25, 3, 0]
    assert all(r.applied for r in result.sublayers)
    for record in result.sublayers:
        layer, kind = record.layer, record.kind
        # X recomputed on the refit model: its layers below are the refit ones (bottom-up)
        x, y = _xy(model, dense, layer, kind, calibration, target, first_token)
        weight, bias, lam = _independent(x, y, 1e-3)
        projection = _projection(model, layer, kind)
        np.testing.assert_allclose(projection.weight.detach().numpy(), weight, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(projection.bias.detach().numpy(), bias, rtol=1e-6, atol=1e-6)
        assert record.lam == pytest.approx(lam, rel=1e-9)
        dense_bias = _projection(dense, layer, kind).bias.detach().numpy()
        before = _projection(unrefit, layer, kind)
        assert record.calibration_before == pytest.approx(
            _relative(x, y, before.weight.detach().numpy(), before.bias.detach().numpy(), dense_bias), rel=1e-6
        )
        assert record.calibration_after == pytest.approx(_relative(x, y, weight, bias, dense_bias), rel=1e-6)
        assert record.calibration_after < record.calibration_before
        if record.units == 0:  # nothing but the bias: it becomes the mean target (FLAP)
            np.testing.assert_allclose(projection.bias.detach().numpy(), y.mean(axis=0), atol=1e-10)
    # bottom-up is real: layer 2's inputs differ between the unrefit and the refit model, and a fit on
    # the unrefit inputs is not what refit wrote
    x_old, y_old = _xy(unrefit, dense, 2, "attention", calibration, target, first_token)
    x_new, _ = _xy(model, dense, 2, "attention", calibration, target, first_token)
    assert np.abs(x_old - x_new).max() > 1e-3
    stale, _, _ = _independent(x_old, y_old, 1e-3)
    assert np.abs(instrument.output_projection(model, 2).weight.detach().numpy() - stale).max() > 1e-3


def test_guard_keeps_the_previous_weights_when_the_refit_overfits():
    model, dense = _pruned(neurons=False)
    few = [padded_batch(batch=1, length=4, seed=5, lengths=[4], pad_id=pad_id(model))]  # 4 tokens, 25 unknowns
    held_out = _batches(model, range(30, 34))
    unguarded = copy.deepcopy(model)
    free = refit(unguarded, dense, few, ridge=1e-9, progress=False)
    assert all(r.calibration_after < 1e-6 for r in free.sublayers if r.units)  # interpolates the 4 tokens
    guarded = copy.deepcopy(model)
    result = refit(guarded, dense, few, held_out=held_out, ridge=1e-9, progress=False)
    kept = [r for r in result.sublayers if not r.applied]
    assert kept, "expected at least one sub-layer to be refused by the guard"
    for record in result.sublayers:
        layer, kind = record.layer, record.kind
        x, y = _xy(guarded, dense, layer, kind, held_out)  # inputs from the final model's layers below
        dense_bias = _projection(dense, layer, kind).bias.detach().numpy()
        previous = _projection(model, layer, kind)
        old_w, old_b = previous.weight.detach().numpy(), previous.bias.detach().numpy()
        final = _projection(guarded, layer, kind)
        new_w, new_b = final.weight.detach().numpy(), final.bias.detach().numpy()
        assert record.held_out_before == pytest.approx(_relative(x, y, old_w, old_b, dense_bias), rel=1e-6)
        # never worse on the held-out rows than the weights it started from
        assert _relative(x, y, new_w, new_b, dense_bias) <= record.held_out_before + 1e-12
        if record.applied:
            assert record.held_out_after <= record.held_out_before
        else:
            assert record.held_out_after > record.held_out_before
            assert np.array_equal(new_w, old_w) and np.array_equal(new_b, old_b)
    # layer 0 (same inputs in every copy): the unguarded refit really is worse on the held-out rows
    first = result.sublayers[0]
    assert (first.layer, first.kind, first.action) == (0, "attention", "kept")
    x, y = _xy(model, dense, 0, "attention", held_out)
    loose = instrument.output_projection(unguarded, 0)
    dense_bias = instrument.output_projection(dense, 0).bias.detach().numpy()
    worse = _relative(x, y, loose.weight.detach().numpy(), loose.bias.detach().numpy(), dense_bias)
    assert worse == pytest.approx(first.held_out_after, rel=1e-6)
    assert worse > 1.5 * first.held_out_before
    assert "kept the previous weights" in result.summary()


def test_refit_brings_the_logits_toward_the_dense_model():
    model, dense = _pruned(std=0.15, dtype=torch.float32)
    calibration = _batches(model, range(10, 16))
    held_out = _batches(model, range(20, 24))

    def distance(batches):
        with torch.no_grad():
            return sum(float((model(**b).logits - dense(**b).logits).square().sum()) for b in batches)

    calibration_before, held_out_before = distance(calibration), distance(held_out)
    result = refit(model, dense, calibration, held_out=held_out, progress=False)
    assert all(r.calibration_after < r.calibration_before for r in result.sublayers)
    assert distance(calibration) < 0.5 * calibration_before
    assert distance(held_out) < 0.5 * held_out_before
    assert result.examples == 48 and result.held_out_examples == 32 and result.tokens > 0
    assert "layer 1 attention: 0/4 heads (bias only)" in result.summary()


def test_sublayers_option_and_a_model_with_nothing_pruned():
    model, dense = _pruned(neurons=True)
    result = refit(model, dense, _batches(model, [10]), sublayers=["ffn"], progress=False)
    assert {r.kind for r in result.sublayers} == {"ffn"}
    assert pruned_sublayers(model, dense, ["attention"]) == [(0, "attention"), (1, "attention"), (2, "attention")]
    same = copy.deepcopy(dense)
    before = [p.clone() for p in same.parameters()]
    assert refit(same, dense, _batches(same, [10]), progress=False).sublayers == []
    assert all(torch.equal(a, b) for a, b in zip(before, same.parameters(), strict=True))


def test_with_the_library_neuron_surgery():
    remove_neurons = getattr(prune.surgery, "remove_neurons", None)
    if remove_neurons is None:
        pytest.skip("prune.surgery.remove_neurons has not landed yet (feed-forward neurons as a unit)")
    model, dense = _pruned(neurons=False)
    remove_neurons(model, {layer: [n for n in range(37) if n not in kept] for layer, kept in NEURONS.items()})
    calibration = _batches(model, range(10, 13))
    result = refit(model, dense, calibration, progress=False)
    assert [r.units for r in result.sublayers if r.kind == "ffn"] == [19, 25, 0]
    for record in result.sublayers:
        x, y = _xy(model, dense, record.layer, record.kind, calibration)
        weight, bias, _ = _independent(x, y, 1e-3)
        projection = _projection(model, record.layer, record.kind)
        np.testing.assert_allclose(projection.weight.detach().numpy(), weight, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(projection.bias.detach().numpy(), bias, rtol=1e-6, atol=1e-6)


def test_bad_input_is_one_line():
    model, dense = _pruned(neurons=False)
    batches = _batches(model, [10])
    cases = [
        (dict(dense=model), "separate reference"),
        (dict(ridge=-1.0), "ridge must be >= 0"),
        (dict(sublayers=["mlp"]), "sublayers must be"),
        (dict(calibration=[]), "at least one calibration batch"),
        (dict(held_out=[]), "held_out was given"),
        (dict(calibration=[{"ids": torch.zeros(1, 2)}]), "tokenizer batch"),
        (dict(dense=tiny_model("bert", layers=2).double()), "another architecture"),
    ]
    for change, message in cases:
        args = {"dense": dense, "calibration": batches, **change}
        with pytest.raises(HeadpruneError, match=message) as info:
            refit(model, args.pop("dense"), args.pop("calibration"), progress=False, **args)
        assert "\n" not in str(info.value)
    masked = copy.deepcopy(dense)
    mask_heads(masked, {0: [0]})
    with pytest.raises(HeadpruneError, match="bake the head mask"):
        refit(masked, dense, batches, progress=False)


def test_refit_result_round_trip(tmp_path):
    model, dense = _pruned(neurons=False)
    result = refit(model, dense, _batches(model, [10]), held_out=_batches(model, [11]), progress=False)
    data = result.to_dict()
    assert data["format"] == "headprune.RefitResult" and data["version"] == 1
    again = RefitResult.load(result.save(tmp_path / "refit.json"))
    assert again == result and isinstance(again.sublayers[0], SublayerRefit)
    assert set(data["sublayers"][0]) >= {"layer", "kind", "units", "action", "lam"}
    # times stay in memory: the same refit writes the same bytes, whatever it took
    assert "seconds" not in data and "seconds" not in data["sublayers"][0]
    assert result.seconds > 0 and again.seconds == 0.0
