"""Physical removal equals masking; pruned checkpoints reload identically and refuse to load wrongly."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.checkpoints import load_model, save_pruned
from prune.masking import mask_heads
from prune.surgery import bake_mask, fold_head_scales, remove_heads
from tests.conftest import FAMILIES, pad_id, padded_batch, stock_attention, tiny_model
from tests.prune_helpers import sensitive, tiny_tokenizer

LAYERS, HEADS = 3, 4


@pytest.fixture
def bert():
    """The tiny BERT with weights spread enough that every head moves the logits."""
    return sensitive(tiny_model("bert"))


def _random_heads(seed: int) -> dict[int, list[int]]:
    """A random head set with one layer losing all its heads and the others a random subset."""
    rng = random.Random(seed)
    empty = rng.randrange(LAYERS)
    heads = {empty: list(range(HEADS))}
    for layer in range(LAYERS):
        if layer != empty:
            heads[layer] = sorted(rng.sample(range(HEADS), rng.randint(0, HEADS - 1)))
    return heads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_removed_for_random_heads(family, seed):
    model = sensitive(tiny_model(family, seed=seed), seed=seed)
    batch = padded_batch(pad_id=pad_id(model), seed=seed + 3)
    heads = _random_heads(seed)
    dense = model(**batch).logits
    with mask_heads(model, heads):
        masked = model(**batch).logits
    remove_heads(model, heads)
    assert instrument.kept_heads(model) == [
        [h for h in range(HEADS) if h not in heads.get(layer, [])] for layer in range(LAYERS)
    ]
    assert model.config._attn_implementation == stock_attention(model)  # removal needs no instrumentation
    removed = model(**batch).logits
    torch.testing.assert_close(removed, masked, atol=1e-5, rtol=0)
    assert (removed - dense).abs().max() > 1e-2
    q_rows = [instrument.output_projection(model, layer).weight.shape[1] for layer in range(LAYERS)]
    assert q_rows == [8 * (HEADS - len(heads.get(layer, []))) for layer in range(LAYERS)]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_zero_head_layer_contributes_exactly_its_output_bias(family):
    """Oracle: a layer with no heads = attention output equal to the projection bias for every token."""
    model = sensitive(tiny_model(family))
    batch = padded_batch(pad_id=pad_id(model))
    reference = copy.deepcopy(model)
    with torch.no_grad():  # zeroing value weights+biases makes every head's context exactly zero
        for name, param in instrument.attention_modules(reference)[1].named_parameters():
            if name.startswith(("value", "v_lin")):
                param.zero_()
    remove_heads(model, {1: [0, 1, 2, 3]})
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0)


def test_repeated_removals_compose_with_original_indices(bert, batch):
    once = copy.deepcopy(bert)
    remove_heads(once, {0: [0, 2], 2: [3]})
    twice = copy.deepcopy(bert)
    assert remove_heads(twice, {0: [2]}) == {0: [2]}
    assert remove_heads(twice, {0: [0, 2], 2: [3]}) == {0: [0], 2: [3]}  # head 2 already gone: ignored
    assert instrument.kept_heads(twice) == instrument.kept_heads(once) == [[1, 3], [0, 1, 2, 3], [0, 1, 2]]
    torch.testing.assert_close(twice(**batch).logits, once(**batch).logits, atol=1e-6, rtol=0)
    assert twice.config.headprune_kept_heads == [[1, 3], [0, 1, 2, 3], [0, 1, 2]]


def test_removing_every_head_is_refused(bert):
    with pytest.raises(HeadpruneError, match="every attention head"):
        remove_heads(bert, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]})
    remove_heads(bert, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2]})
    with pytest.raises(HeadpruneError, match="every attention head"):
        remove_heads(bert, {2: [3]})
    with pytest.raises(HeadpruneError, match="unknown head 9"):
        remove_heads(bert, {2: [9]})


def test_fold_scales_equals_gates(bert, batch):
    scales = torch.tensor([0.5, -1.0, 2.0, 1.5])
    instrument.set_head_mask(bert, [None, scales, None])
    gated = bert(**batch).logits
    instrument.set_head_mask(bert, None)
    fold_head_scales(bert, 1, scales)
    torch.testing.assert_close(bert(**batch).logits, gated, atol=1e-5, rtol=0)


def test_bake_mask_removes_zero_gates_and_folds_scales(bert, batch):
    instrument.set_head_mask(bert, [torch.tensor([0.0, 1.3, 0.0, 0.7]), None, torch.tensor([1.0, 1.0, 1.0, 0.0])])
    gated = bert(**batch).logits
    assert bake_mask(bert) == {0: [0, 2], 2: [3]}
    assert instrument.get_head_mask(bert) == [None, None, None]
    assert instrument.kept_heads(bert) == [[1, 3], [0, 1, 2, 3], [0, 1, 2]]
    assert bert.config._attn_implementation == "sdpa"
    torch.testing.assert_close(bert(**batch).logits, gated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model = sensitive(tiny_model(family, seed=2))
    batch = padded_batch(pad_id=pad_id(model))
    remove_heads(model, _random_heads(2))
    expected = model(**batch).logits
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    path = save_pruned(model, tmp_path / "pruned", tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert config["headprune_kept_heads"] == instrument.kept_heads(model)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()
    loaded, loaded_tokenizer = load_model(path)
    assert instrument.kept_heads(loaded) == instrument.kept_heads(model)
    assert loaded_tokenizer is not None and loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert loaded.config._attn_implementation == stock_attention(loaded) and not loaded.training
    torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
    # plain from_pretrained must not silently build a wrong dense model from it
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForSequenceClassification.from_pretrained(path)


def test_saving_a_masked_model_bakes_a_copy(bert, batch, tmp_path):
    instrument.set_head_mask(bert, [torch.tensor([0.0, 1.2, 1.0, 1.0]), None, None])
    expected = bert(**batch).logits
    path = save_pruned(bert, tmp_path / "masked")
    assert instrument.kept_heads(bert)[0] == [0, 1, 2, 3]  # the caller's model is untouched
    assert not hasattr(bert.config, "headprune_kept_heads")
    with pytest.raises(HeadpruneError, match="no tokenizer saved with the model"):
        load_model(path)
    loaded, tokenizer = load_model(path, tokenizer=False)
    assert tokenizer is None
    assert instrument.kept_heads(loaded)[0] == [1, 2, 3]
    torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
    # saving again over an existing directory replaces it completely
    remove_heads(bert, {2: [1]})
    save_pruned(bert, path)
    assert instrument.kept_heads(load_model(path, tokenizer=False)[0])[2] == [0, 2, 3]


def test_load_errors_are_one_line(bert, tmp_path):
    with pytest.raises(HeadpruneError, match="model directory not found"):
        load_model(tmp_path / "missing")
    remove_heads(bert, {0: [1]})
    path = save_pruned(bert, tmp_path / "p")
    config = json.loads((path / "config.json").read_text())
    config["headprune_kept_heads"] = [[0, 1, 2], [0, 1, 2, 3]]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadpruneError, match="for each of the 3 layers"):
        load_model(path)
    config["headprune_kept_heads"] = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]  # weights say otherwise
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadpruneError, match="do not fit the recorded heads") as error:
        load_model(path)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_real_minilm_masked_equals_removed_and_round_trips(tmp_path):
    torch.manual_seed(0)  # the classification head is freshly initialised
    model, tokenizer = load_model("minilm")
    batch = dict(tokenizer(["the movie was great", "terrible service, never again!!"], padding=True,
                           return_tensors="pt"))
    heads = {0: [0, 5, 11], 3: list(range(12)), 5: [1, 2, 3, 4, 5, 6]}
    with mask_heads(model, heads):
        masked = model(**batch).logits
    remove_heads(model, heads)
    torch.testing.assert_close(model(**batch).logits, masked, atol=1e-5, rtol=0)
    loaded, _ = load_model(save_pruned(model, tmp_path / "minilm", tokenizer))
    torch.testing.assert_close(loaded(**batch).logits, masked, atol=1e-5, rtol=0)
    assert instrument.heads_per_layer(loaded) == [9, 12, 12, 0, 12, 6]
