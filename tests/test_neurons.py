"""Feed-forward neurons as a prunable unit: gates, capture, masks, removal, checkpoints, ONNX, FLOPs."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.checkpoints import KEPT_HEADS_KEY, KEPT_NEURONS_KEY, load_model, save_pruned
from prune.cost import model_flops
from prune.masking import mask_heads, mask_neurons, masked_neurons, unmask_neurons
from prune.surgery import bake_mask, remove_heads, remove_neurons
from tests.conftest import FAMILIES, pad_id, padded_batch, tiny_model
from tests.prune_helpers import sensitive

LAYERS, HEADS, WIDTH = 3, 4, 37  # tiny_model's shape


def _model(family: str = "bert", seed: int = 0):
    return sensitive(tiny_model(family, seed=seed), seed=seed)


def _batch(model, seed: int = 1):
    return padded_batch(pad_id=pad_id(model), seed=seed)


def _random_neurons(seed: int, empty: int) -> dict[int, list[int]]:
    """Layer ``empty`` loses every neuron, the others a random subset (possibly none)."""
    rng = random.Random(seed)
    neurons = {empty: list(range(WIDTH))}
    for layer in range(LAYERS):
        if layer != empty:
            neurons[layer] = sorted(rng.sample(range(WIDTH), rng.randint(0, WIDTH - 1)))
    return neurons


# --------------------------------------------------------------------------------------------
# Masked == removed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_removed_with_an_empty_ffn_and_a_headless_layer(family):
    model = _model(family)
    batch = _batch(model)
    neurons = _random_neurons(seed=len(family), empty=1)
    heads = {0: list(range(HEADS)), 2: [1]}  # layer 0 keeps no head, layer 1 no neuron
    with torch.no_grad():
        dense = model(**batch).logits
        with mask_heads(model, heads), mask_neurons(model, neurons):
            assert masked_neurons(model) == {layer: n for layer, n in neurons.items() if n}
            masked = model(**batch).logits
        torch.testing.assert_close(model(**batch).logits, dense, atol=0, rtol=0)  # masks undone exactly
        remove_heads(model, heads)
        removed_now = remove_neurons(model, neurons)
        removed = model(**batch).logits
    assert removed_now == {layer: n for layer, n in neurons.items() if n}
    expected_kept = [[n for n in range(WIDTH) if n not in neurons.get(layer, [])] for layer in range(LAYERS)]
    assert instrument.kept_neurons(model) == expected_kept
    assert getattr(model.config, KEPT_NEURONS_KEY) == expected_kept
    assert instrument.neurons_per_layer(model) == [len(k) for k in expected_kept]
    assert instrument.heads_per_layer(model) == [0, 4, 3]
    for layer, kept in enumerate(expected_kept):
        assert instrument.intermediate_projection(model, layer).weight.shape == (len(kept), 8 * HEADS)
        assert instrument.ffn_output_projection(model, layer).weight.shape[1] == len(kept)
    torch.testing.assert_close(removed, masked, atol=1e-5, rtol=0)
    assert (removed - dense).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_empty_ffn_layer_adds_exactly_its_output_bias(family):
    """Oracle: zeroing the intermediate linear makes every activation act(0) = 0, so the block's
    output is the output bias; removing every neuron must compute the same."""
    model = _model(family)
    batch = _batch(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        intermediate = instrument.intermediate_projection(reference, 1)
        intermediate.weight.zero_()
        intermediate.bias.zero_()
    remove_neurons(model, {1: range(WIDTH)})
    assert instrument.neurons_per_layer(model) == [WIDTH, 0, WIDTH]
    seen = {}
    projection = instrument.ffn_output_projection(model, 1)
    handle = projection.register_forward_hook(lambda module, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        got = model(**batch).logits
    handle.remove()
    assert torch.equal(seen["out"], projection.bias.expand_as(seen["out"]))
    torch.testing.assert_close(got, reference(**batch).logits.detach(), atol=1e-5, rtol=0)


def test_removals_compose_with_original_indices():
    model = _model()
    batch = _batch(model)
    once = copy.deepcopy(model)
    remove_neurons(once, {0: [1, 2, 3, 30], 2: [5]})
    remove_neurons(model, {0: [1, 30]})
    assert remove_neurons(model, {0: [1, 2, 3], "2": [5]}) == {0: [2, 3], 2: [5]}  # 1 already gone
    assert instrument.kept_neurons(model) == instrument.kept_neurons(once)
    torch.testing.assert_close(model(**batch).logits, once(**batch).logits, atol=0, rtol=0)


def test_bad_neuron_sets_are_one_line_errors():
    model = _model()
    remove_neurons(model, {0: [4]})
    for bad in ({5: [0]}, {0: [WIDTH]}, {0: [-1]}, {0: "12"}, [(0, 1)], {0: [True]}):
        with pytest.raises(HeadpruneError) as error:
            remove_neurons(model, bad)
        assert "\n" not in str(error.value)
    with pytest.raises(HeadpruneError, match="already removed"):
        mask_neurons(model, {0: [4]})
    with pytest.raises(HeadpruneError, match="not present"):
        instrument.keep_neurons_in_layer(model, 0, [4, 5])


# --------------------------------------------------------------------------------------------
# Gates and capture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_gates_at_one_change_nothing_and_compose_with_the_attention_probe(family):
    model = _model(family)
    batch = _batch(model)
    with torch.no_grad():
        dense = model(**batch).logits
        with instrument.NeuronProbe(model) as probe:
            probe.gates = {0: torch.ones(WIDTH), 2: torch.ones(3, WIDTH)}
            assert torch.equal(model(**batch).logits, dense)
        with instrument.AttentionProbe(model, capture=True):
            eager = model(**batch).logits
        with instrument.AttentionProbe(model, capture=True) as heads, instrument.NeuronProbe(model) as neurons:
            heads.gates = {1: torch.ones(HEADS)}
            neurons.gates = {l: torch.ones(WIDTH) for l in range(LAYERS)}
            assert torch.equal(model(**batch).logits, eager)
            # both act at once: zero gates == removing those heads and neurons
            heads.gates = {1: torch.tensor([0.0, 1.0, 0.0, 1.0])}
            neurons.gates = {2: (torch.arange(WIDTH) % 3 != 0).float()}
            both = model(**batch).logits
    assert all(not m._forward_hooks for m in instrument.neurons._activations(model))  # hooks gone
    remove_heads(model, {1: [0, 2]})
    remove_neurons(model, {2: list(range(0, WIDTH, 3))})
    torch.testing.assert_close(model(**batch).logits, both, atol=1e-5, rtol=0)


def test_gate_gradient_equals_a_finite_difference():
    model = _model().double()
    batch = _batch(model)
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(WIDTH, generator=generator, dtype=torch.float64) + 0.5  # away from 1: a general point

    def objective(gate: torch.Tensor) -> torch.Tensor:
        with instrument.NeuronProbe(model) as probe:
            probe.gates = {1: gate}
            logits = model(**batch).logits
        return (logits[:, 0] - 2 * logits[:, 2]).sum()

    gate = base.clone().requires_grad_()
    objective(gate).backward()
    eps = 1e-6
    for j in (0, 7, 20, 36):
        step = torch.zeros(WIDTH, dtype=torch.float64)
        step[j] = eps
        with torch.no_grad():
            numeric = (objective(base + step) - objective(base - step)) / (2 * eps)
        assert abs(float(gate.grad[j]) - float(numeric)) < 1e-6 * max(1.0, abs(float(numeric)))
    assert gate.grad.abs().max() > 1e-3


def test_per_example_gates_and_captured_activations():
    """A ``[B, F]`` gate's row b is example b's gradient; summed, the ``[F]`` gate's; and the gate
    gradient at 1 is sum over tokens of activation * d objective / d activation (capture)."""
    model = _model().double()
    batch = _batch(model)
    with instrument.NeuronProbe(model, capture=True) as probe:
        shared = torch.ones(WIDTH, dtype=torch.float64, requires_grad=True)
        probe.gates = {2: shared}
        model(**batch).logits[:, 1].sum().backward()
        activation = probe.activations[2]
        assert activation.shape == (3, 7, WIDTH) and set(probe.activations) == {0, 1, 2}
        torch.testing.assert_close(shared.grad, (activation * activation.grad).sum(dim=(0, 1)), atol=1e-10, rtol=0)
        probe.clear()
        per_example = torch.ones(3, WIDTH, dtype=torch.float64, requires_grad=True)
        probe.gates = {2: per_example}
        model(**batch).logits[:, 1].sum().backward()
        torch.testing.assert_close(per_example.grad.sum(0), shared.grad, atol=1e-10, rtol=0)
        for row in range(3):
            alone = torch.ones(WIDTH, dtype=torch.float64, requires_grad=True)
            probe.gates = {2: alone}
            model(**{k: v[row : row + 1] for k, v in batch.items()}).logits[:, 1].sum().backward()
            torch.testing.assert_close(per_example.grad[row], alone.grad, atol=1e-10, rtol=0)
        probe.gates = {2: torch.ones(WIDTH + 1, dtype=torch.float64)}
        with pytest.raises(HeadpruneError, match="neuron gate of layer 2"):
            model(**batch)
    with instrument.NeuronProbe(model), pytest.raises(HeadpruneError, match="already instrumented"):
        instrument.NeuronProbe(model).__enter__()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_first_token_fast_path_sees_pruned_and_gated_neurons(family):
    """AttAttr's last-layer fast path runs the pruned feed-forward blocks and the gates too."""
    model = _model(family)
    batch = _batch(model)
    remove_neurons(model, {2: list(range(WIDTH)), 1: [0, 3]})
    with torch.no_grad(), instrument.NeuronProbe(model, capture=True) as probe:
        probe.gates = {1: torch.linspace(0, 1, WIDTH - 2)}
        full = model(**batch).logits
        with instrument.first_token_last_layer(model):
            fast = model(**batch).logits
        assert probe.activations[2].shape == (3, 1, 0)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)


def test_persistent_masks_survive_copies_and_bake_into_weights():
    model = _model()
    batch = _batch(model)
    with torch.no_grad():
        dense = model(**batch).logits
    scales = torch.linspace(0.0, 2.0, WIDTH)  # neuron 0 gated to 0, the rest scaled
    instrument.set_neuron_mask(model, [None, scales, torch.zeros(WIDTH)])
    copied = copy.deepcopy(model)
    unmask_neurons(copied)  # must not unhook the original
    with torch.no_grad():
        masked = model(**batch).logits
        torch.testing.assert_close(copied(**batch).logits, dense, atol=0, rtol=0)
    assert (masked - dense).abs().max() > 1e-2
    with pytest.raises(HeadpruneError, match="expected"):
        instrument.set_neuron_mask(model, [None, torch.ones(3), None])
    bake_mask(model)
    assert instrument.get_neuron_mask(model) == [None, None, None]
    assert instrument.kept_neurons(model) == [list(range(WIDTH)), list(range(1, WIDTH)), []]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _uneven(family: str):
    model = _model(family)
    remove_heads(model, {0: [0, 1, 2, 3], 2: [2]})
    remove_neurons(model, {0: list(range(0, WIDTH, 2)), 1: list(range(WIDTH))})
    return model


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_save_load_round_trip_with_uneven_widths(family, tmp_path):
    model = _uneven(family)
    mask_neurons(model, {2: [3, 4]})  # a mask is baked into the saved copy, not into `model`
    batch = _batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
    path = save_pruned(model, tmp_path / "model")
    assert instrument.get_neuron_mask(model)[2] is not None
    saved = json.loads((path / "config.json").read_text())
    assert saved[KEPT_NEURONS_KEY][2] == [n for n in range(WIDTH) if n not in (3, 4)]
    loaded, _ = load_model(path, tokenizer=False)
    assert instrument.neurons_per_layer(loaded) == [18, 0, WIDTH - 2]
    assert instrument.kept_neurons(loaded) == saved[KEPT_NEURONS_KEY]
    assert instrument.heads_per_layer(loaded) == [0, 4, 3]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_neuron_only_and_dense_checkpoints(tmp_path):
    model = _model()
    batch = _batch(model)
    dense_path = save_pruned(model, tmp_path / "dense")
    assert KEPT_NEURONS_KEY not in json.loads((dense_path / "config.json").read_text())  # dense FFNs: no key
    remove_neurons(model, {1: [0, 1]})
    loaded, _ = load_model(save_pruned(model, tmp_path / "neurons"), tokenizer=False)
    assert instrument.kept_heads(loaded) == [list(range(HEADS))] * LAYERS
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    # a config recording only neurons (no heads key) loads too
    config = json.loads((tmp_path / "neurons" / "config.json").read_text())
    del config[KEPT_HEADS_KEY]
    (tmp_path / "neurons" / "config.json").write_text(json.dumps(config))
    assert instrument.neurons_per_layer(load_model(tmp_path / "neurons", tokenizer=False)[0]) == [WIDTH, 35, WIDTH]


@pytest.mark.parametrize(
    "recorded, message",
    [
        (lambda kept: [kept[0][:-1], kept[1], kept[2]], "do not fit"),  # one width too small
        (lambda kept: [kept[0], [0, 1], kept[2]], "do not fit"),  # an emptied layer given neurons
        (lambda kept: kept[:2], "must list"),
        (lambda kept: [kept[0], kept[1], [0, 0]], "must list"),
        (lambda kept: [kept[0], kept[1], [WIDTH]], "must list"),
        (lambda kept: "all", "must list"),
    ],
)
def test_recorded_widths_that_do_not_match_the_weights_are_one_line_errors(tmp_path, recorded, message):
    path = save_pruned(_uneven("bert"), tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config[KEPT_NEURONS_KEY] = recorded(config[KEPT_NEURONS_KEY])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadpruneError, match=message) as error:
        load_model(path, tokenizer=False)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


# --------------------------------------------------------------------------------------------
# ONNX and FLOPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_onnx_export_of_a_neuron_pruned_model_matches_pytorch(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from prune import export

    model = _uneven(family)
    assert instrument.neurons_per_layer(model) == [18, 0, WIDTH]
    mask_neurons(model, {2: [1]})
    with pytest.raises(HeadpruneError, match="soft neuron mask"):
        export.export_onnx(model, tmp_path / "masked.onnx")
    unmask_neurons(model)
    result = export.export_and_check(model, tmp_path / "model.onnx", atol=1e-5)
    assert result.max_abs_diff <= 1e-5 and result.checked_examples == 8


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_flops_drop_by_two_t_d_per_removed_neuron(family):
    model = tiny_model(family)
    hidden = 8 * HEADS
    before = {t: model_flops(model, t) for t in (5.0, 12.5)}
    remove_neurons(model, {0: [1, 2, 3], 1: list(range(WIDTH))})
    remove_heads(model, {2: [0]})  # heads are counted apart: take their cost out first
    head = 4 * hidden * 8
    for t, flops in before.items():
        head_cost = head * t + 2 * t**2 * 8
        assert model_flops(model, t) == pytest.approx(flops - (3 + WIDTH) * 2 * t * hidden - head_cost, rel=1e-12)
