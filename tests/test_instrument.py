"""The instrumentation module: no-op equality, restoration, gates, capture, unsupported models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from attribution import instrument
from attribution.core.errors import HeadpruneError
from tests.conftest import FAMILIES, pad_id, padded_batch, stock_attention, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_instrumentation_matches_stock_model_with_padding(family):
    model = tiny_model(family)
    batch = padded_batch(pad_id=pad_id(model))
    stock = model(**batch).logits
    # MPNet computes attention inline (no attention interface): headprune's forward stands in instead
    interface = instrument.model_family(model).interface
    assert model.config._attn_implementation == stock_attention(model)
    own_forward = [m.forward for m in instrument.attention_modules(model)]
    with instrument.AttentionProbe(model, capture=True) as probe:
        if interface:
            assert model.config._attn_implementation == instrument.ATTN_IMPLEMENTATION
        probed = model(**batch).logits
        assert sorted(probe.attentions) == [0, 1, 2]
        attention = probe.attentions[1]
    assert model.config._attn_implementation == stock_attention(model)
    assert [m.forward for m in instrument.attention_modules(model)] == own_forward
    torch.testing.assert_close(probed, stock, atol=1e-5, rtol=0)
    assert attention.shape == (3, 4, 7, 7)
    # padding keys get exactly zero probability: the mask interface is honoured
    assert attention[2][..., 3:].abs().max() == 0 and attention[2][..., :3].min() > 0
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4, 7))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_unpadded_runs(family):
    model = tiny_model(family)
    batch = padded_batch(pad_id=pad_id(model))
    with instrument.AttentionProbe(model):
        padded = model(**batch).logits
        for row in range(3):
            n = int(batch["attention_mask"][row].sum())
            alone = model(**{k: v[row : row + 1, :n] for k, v in batch.items()}).logits
            torch.testing.assert_close(alone[0], padded[row], atol=1e-5, rtol=0)


def test_implementation_restored_after_exception(bert, batch):
    with pytest.raises(RuntimeError, match="boom"):
        with instrument.AttentionProbe(bert):
            raise RuntimeError("boom")
    assert bert.config._attn_implementation == "sdpa"
    assert all(getattr(m, "_headprune_probe", None) is None for m in instrument.attention_modules(bert))


def test_nested_probes_are_refused(bert):
    with instrument.AttentionProbe(bert):
        with pytest.raises(HeadpruneError, match="already instrumented"):
            with instrument.AttentionProbe(bert):
                pass


def test_zero_gate_equals_zeroed_output_columns(bert, batch):
    """Gating a head to 0 is what removing its output-projection columns computes."""
    with instrument.AttentionProbe(bert) as probe:
        probe.gates[1] = torch.tensor([1.0, 0.0, 1.0, 1.0])
        gated = bert(**batch).logits
    dense = bert.bert.encoder.layer[1].attention.output.dense
    with torch.no_grad():
        dense.weight[:, 8:16] = 0
    torch.testing.assert_close(bert(**batch).logits, gated, atol=1e-6, rtol=0)


def test_gates_are_differentiable_per_example(bert, batch):
    gates = torch.ones(3, 4, requires_grad=True)
    with instrument.AttentionProbe(bert) as probe:
        probe.gates[0] = gates
        bert(**batch).logits[0, 0].backward()
    assert gates.grad[0].abs().sum() > 0
    torch.testing.assert_close(gates.grad[1:], torch.zeros(2, 4))  # other examples don't affect row 0


def test_replace_with_tensor_and_gradient_capture(bert, batch):
    with instrument.AttentionProbe(bert, capture=True) as probe:
        bert(**batch)
        original = probe.attentions[2].detach()
    scaled = (0.5 * original).requires_grad_(True)
    with instrument.AttentionProbe(bert) as probe:
        probe.replace[2] = scaled
        bert(**batch).logits.sum().backward()
    assert scaled.grad is not None and scaled.grad.abs().sum() > 0


def test_start_at_layer_equals_full_forward(bert, batch):
    hidden = instrument.layer_inputs(bert, batch)
    full = bert(**batch).logits
    for layer in range(3):
        with instrument.start_at_layer(bert, layer, hidden[layer]):
            torch.testing.assert_close(bert(**batch).logits, full, atol=1e-6, rtol=0)
    # and the skipped layers really are skipped: garbage hidden states change the output
    with instrument.start_at_layer(bert, 2, torch.randn_like(hidden[2])):
        assert (bert(**batch).logits - full).abs().max() > 1e-3
    assert "forward" not in bert.bert.encoder.layer[0].__dict__


def test_persistent_mask_switches_backend_and_back(bert, batch):
    instrument.set_head_mask(bert, [None, torch.tensor([0.0, 1, 1, 1]), None])
    assert bert.config._attn_implementation == instrument.ATTN_IMPLEMENTATION
    with instrument.AttentionProbe(bert):
        pass
    assert bert.config._attn_implementation == instrument.ATTN_IMPLEMENTATION  # the mask still needs it
    instrument.set_head_mask(bert, None)
    assert bert.config._attn_implementation == "sdpa"
    with pytest.raises(HeadpruneError, match="shape"):
        instrument.set_head_mask(bert, [torch.ones(3), None, None])


def test_unsupported_family_gets_one_clear_error():
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, num_labels=2))
    with pytest.raises(HeadpruneError, match="'gpt2' is not supported; headprune supports bert, roberta"):
        instrument.AttentionProbe(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("last_layer_heads", [[0, 1, 2, 3], [1, 3], []])
def test_first_token_last_layer_keeps_logits(family, last_layer_heads):
    model = tiny_model(family)
    instrument.keep_heads_in_layer(model, 2, last_layer_heads)
    batch = padded_batch(pad_id=pad_id(model))
    full = model(**batch).logits
    with instrument.first_token_last_layer(model):
        torch.testing.assert_close(model(**batch).logits, full, atol=1e-6, rtol=0)
    if last_layer_heads:  # a full-size replacement for the cut layer: only its first query row is used
        with instrument.AttentionProbe(model, capture=True) as probe:
            model(**batch)
            probe.replace[2] = probe.attentions[2].detach()
            probe.capture = False
            with instrument.first_token_last_layer(model):
                torch.testing.assert_close(model(**batch).logits, full, atol=1e-6, rtol=0)
    assert "forward" not in instrument.encoder_layers(model)[2].__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_first_token_last_layer_applies_head_gates(family):
    """The cut last layer skips the key and value projections (its query is carried back through
    W_k); persistent gates still apply to its heads."""
    model = tiny_model(family)
    batch = padded_batch(pad_id=pad_id(model))
    instrument.set_head_mask(model, [None, None, torch.tensor([1.0, 0.0, 0.5, 1.0])])
    full = model(**batch).logits
    with instrument.first_token_last_layer(model):
        torch.testing.assert_close(model(**batch).logits, full, atol=1e-6, rtol=0)
