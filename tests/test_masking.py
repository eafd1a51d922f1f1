"""Soft masking: what a zero gate computes, restoration, composition and bad input."""

from __future__ import annotations

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.masking import active_heads, head_gates, mask_heads, masked_heads, normalize_heads, unmask_heads
from tests.conftest import padded_batch, tiny_model
from tests.prune_helpers import sensitive


@pytest.fixture
def bert():
    """The tiny BERT with weights spread enough that every head moves the logits."""
    return sensitive(tiny_model("bert"))


def _zero_columns_reference(model, heads, batch):
    """Independent oracle: zero the masked heads' output-projection columns of a copy."""
    import copy

    clone = copy.deepcopy(model)
    d_h = instrument.head_size(clone)
    with torch.no_grad():
        for layer, layer_heads in heads.items():
            weight = instrument.output_projection(clone, layer).weight
            for head in layer_heads:
                weight[:, head * d_h : (head + 1) * d_h] = 0
    return clone(**batch).logits


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_mask_equals_zeroed_output_columns_and_restores(family):
    model = sensitive(tiny_model(family))
    batch = padded_batch(pad_id=int(model.config.pad_token_id or 0))
    dense = model(**batch).logits
    heads = {0: [1, 3], 1: [0, 1, 2, 3]}
    expected = _zero_columns_reference(model, heads, batch)
    with mask_heads(model, heads) as handle:
        assert handle.heads == heads
        masked = model(**batch).logits
        assert masked_heads(model) == heads
        assert active_heads(model) == [[0, 2], [], [0, 1, 2, 3]]
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=0)
    assert (masked - dense).abs().max() > 1e-2  # the heads did matter
    # restored exactly: no gates, fast backend, same logits
    assert instrument.get_head_mask(model) == [None, None, None]
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(**batch).logits, dense, atol=0, rtol=0)


def test_persistent_masks_compose_and_restore_to_previous(bert, batch):
    first = mask_heads(bert, {0: [0]})  # persistent
    assert bert.config._attn_implementation == instrument.ATTN_IMPLEMENTATION
    with mask_heads(bert, [(0, 2), (2, 1)]):
        assert masked_heads(bert) == {0: [0, 2], 2: [1]}
        both = bert(**batch).logits
    assert masked_heads(bert) == {0: [0]}  # the inner context only undid its own heads
    expected = _zero_columns_reference(bert, {0: [0, 2], 2: [1]}, batch)
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
    first.restore()
    assert masked_heads(bert) == {} and bert.config._attn_implementation == "sdpa"


def test_masking_keeps_existing_scales(bert, batch):
    instrument.set_head_mask(bert, [torch.tensor([0.5, 2.0, 1.0, 1.0]), None, None])
    with mask_heads(bert, {0: [1], 1: [3]}):
        gates = head_gates(bert)
        torch.testing.assert_close(gates[0], torch.tensor([0.5, 0.0, 1.0, 1.0]))
        torch.testing.assert_close(gates[1], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(head_gates(bert)[0], torch.tensor([0.5, 2.0, 1.0, 1.0]))
    unmask_heads(bert)
    assert bert.config._attn_implementation == "sdpa"


def test_mask_uses_original_indices_after_removal(bert, batch):
    instrument.keep_heads_in_layer(bert, 1, [1, 3])
    with mask_heads(bert, {1: [3]}):
        assert head_gates(bert)[1].tolist() == [1.0, 0.0]
        assert masked_heads(bert) == {1: [3]}
    with pytest.raises(HeadpruneError, match=r"layer 1: head\(s\) \[0\] were already removed"):
        mask_heads(bert, {1: [0]})


@pytest.mark.parametrize(
    "heads, message",
    [
        ({5: [0]}, "unknown layer 5"),
        ({0: [4]}, "unknown head 4 in layer 0"),
        ({0: [-1]}, "unknown head -1"),
        ({0: ["a"]}, "must be an integer"),
        ({0: 3}, "must be a list of head indices"),
        ([(0, 1, 2)], r"\(layer, head\) pairs"),
        (7, "heads must be"),
    ],
)
def test_bad_heads_are_one_line_errors(bert, heads, message):
    with pytest.raises(HeadpruneError, match=message) as error:
        mask_heads(bert, heads)
    assert "\n" not in str(error.value)
    assert instrument.get_head_mask(bert) == [None, None, None]  # nothing half-applied


def test_masking_everything_is_refused_unless_allowed(bert, batch):
    everything = {layer: [0, 1, 2, 3] for layer in range(3)}
    with pytest.raises(HeadpruneError, match="every attention head"):
        mask_heads(bert, everything)
    with mask_heads(bert, everything, allow_empty_model=True):
        bert(**batch)


def test_normalize_heads_accepts_json_style_keys():
    assert normalize_heads({"1": [3, 0, 3], 0: []}, 2, 4) == {1: [0, 3]}
    assert normalize_heads([(1, 2), (0, 1), (1, 2)], 2, 4) == {0: [1], 1: [2]}
