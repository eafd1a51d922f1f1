"""The disentangled-attention diagnostic (unary share) and the gradient-weighted head criterion."""

from __future__ import annotations

import pytest
import torch

from attribution import CRITERIA, head_importance, instrument
from attribution.disentangled import head_unary_share, logit_decomposition, unary_share
from tests.conftest import padded_batch, sharp_model, tiny_model


def test_criteria_are_registered():
    assert {"unary_share", "pairwise_share", "gradient_weighted"} <= set(CRITERIA)


def test_decomposition_reproduces_the_attention():
    model = sharp_model()
    inputs = padded_batch(seed=2)
    mask = inputs["attention_mask"]
    with torch.no_grad(), instrument.AttentionProbe(model, capture=True) as probe:
        model(**inputs)
        hidden = instrument.layer_inputs(model, inputs)
        for layer in range(3):
            proj = instrument.head_projections(model, layer, hidden[layer])
            pairwise, unary = logit_decomposition(proj.query, proj.key, mask)
            # the dropped terms are constant over keys, so the softmax over real keys is unchanged
            logits = proj.scaling * (pairwise + unary[:, :, None, :])
            logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
            real = mask.bool()[:, None, :, None].expand_as(logits)
            assert torch.allclose(torch.softmax(logits, -1)[real], probe.attentions[layer][real], atol=1e-5)


def test_unary_share_hand_computed():
    # T = 3, d = 1: q = [1, 2, 3] (mu_q = 2), k = [0, 1, 5] (mu_k = 2)
    # unary mu_q * k = [0, 2, 10]; pairwise (q_i - 2) * (k_j - 2) for q_i - 2 in (-1, 0, 1)
    q = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    k = torch.tensor([0.0, 1.0, 5.0]).view(1, 1, 3, 1)
    unary = torch.tensor([0.0, 2.0, 10.0])
    u = ((unary - unary.mean()) ** 2).mean()  # (16 + 4 + 36) / 3 = 18.667
    centred_k = torch.tensor([-2.0, -1.0, 3.0])
    p = torch.stack([((qi * centred_k - (qi * centred_k).mean()) ** 2).mean() for qi in (-1.0, 0.0, 1.0)]).mean()
    share = unary_share(q, k, torch.ones(1, 3))
    assert torch.allclose(share, (u / (u + p)).double().view(1, 1))
    # a padded fourth token changes nothing
    q4 = torch.cat([q, torch.full((1, 1, 1, 1), 9.0)], dim=2)
    k4 = torch.cat([k, torch.full((1, 1, 1, 1), -7.0)], dim=2)
    assert torch.allclose(unary_share(q4, k4, torch.tensor([[1, 1, 1, 0]])), share)


def content_and_degenerate_heads():
    """Layer 0 of a tiny BERT: head 0 ignores the query (zero query weights, a bias), head 1 attends
    by content (q = k = the same projection of the token, no biases)."""
    model = tiny_model("bert", layers=1, heads=4, seed=5)
    d = 8
    attention = model.bert.encoder.layer[0].attention.self
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attention.query.weight[:d] = 0.0
        attention.query.bias[:d] = torch.randn(d, generator=generator)
        projection = torch.randn(d, 32, generator=generator)
        attention.query.weight[d : 2 * d] = projection
        attention.key.weight[d : 2 * d] = projection
        attention.query.bias[d : 2 * d] = 0.0
        attention.key.bias[d : 2 * d] = 0.0
    return model


def test_unary_share_of_a_query_independent_and_a_content_head():
    model = content_and_degenerate_heads()
    inputs = padded_batch(batch=4, length=9, seed=3)
    share = head_unary_share(model, inputs)  # [B, 1, H]
    assert torch.allclose(share[:, 0, 0], torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert (share[:, 0, 1] < 0.3).all(), share[:, 0, 1]  # 0.05..0.23 here (the 3-token row is highest)


def test_uniform_attention_counts_as_query_independent():
    q = torch.zeros(2, 1, 4, 3)
    assert torch.equal(unary_share(q, torch.zeros(2, 1, 4, 3), torch.ones(2, 4)), torch.ones(2, 1, dtype=torch.float64))


def test_criterion_is_the_mean_share_and_batches_do_not_matter():
    model = sharp_model()
    inputs = padded_batch(batch=4, length=8, seed=9)
    per_example = head_unary_share(model, inputs)
    assert per_example.shape == (4, 3, 4) and ((per_example >= 0) & (per_example <= 1)).all()
    for b in range(4):
        n = int(inputs["attention_mask"][b].sum())
        alone = head_unary_share(model, {k: v[b : b + 1, :n] for k, v in inputs.items()})
        assert torch.allclose(alone[0], per_example[b], atol=1e-9)
    halves = [{k: v[:2] for k, v in inputs.items()}, {k: v[2:] for k, v in inputs.items()}]
    scores = head_importance(model, halves, "unary_share", progress=False)
    assert torch.allclose(scores.values, per_example.mean(0), atol=1e-12)
    assert scores.provenance["examples"] == 4
    pairwise = head_importance(model, halves, "pairwise_share", progress=False)
    assert torch.allclose(pairwise.values, 1 - scores.values, atol=1e-12)
    assert abs(pairwise.spearman(scores) + 1) < 1e-9


def test_pruned_heads_score_zero_and_the_others_are_unchanged():
    model = sharp_model()
    inputs = padded_batch(seed=4)
    before = head_unary_share(model, inputs)
    instrument.keep_heads_in_layer(model, 0, [1, 3])
    instrument.keep_heads_in_layer(model, 2, [])
    after = head_unary_share(model, inputs)
    assert (after[:, 0, [0, 2]] == 0).all() and (after[:, 2] == 0).all()
    assert torch.allclose(after[:, 0, [1, 3]], before[:, 0, [1, 3]], atol=1e-6)
    pairwise = head_importance(model, [inputs], "pairwise_share", progress=False).values
    assert (pairwise[2] == 0).all() and (pairwise[0, [0, 2]] == 0).all()


@pytest.mark.parametrize("target", ["predicted", "gold"])
def test_gradient_weighted_criterion_equals_an_independent_computation(target):
    model = sharp_model()
    inputs = padded_batch(seed=6)
    labels = torch.tensor([2, 0, 1])
    mask = inputs["attention_mask"]
    # independent route: parameters require grad, so the captured attentions are graph nodes
    with instrument.AttentionProbe(model, capture=True) as probe:
        logits = model(**inputs).logits
        classes = labels if target == "gold" else logits.argmax(-1)
        logits.gather(1, classes[:, None]).sum().backward()
        attentions = {k: (v.detach(), v.grad) for k, v in probe.attentions.items()}
    model.zero_grad()
    pair = (mask[:, :, None] * mask[:, None, :]).float()
    expected = torch.zeros(3, 3, 4, dtype=torch.float64)
    for layer, (a, g) in attentions.items():
        weights = (a * g).clamp_min(0) * pair[:, None]
        expected[:, layer] = (weights.sum((2, 3)) / pair.sum((1, 2))[:, None]).double()
    criterion = CRITERIA["gradient_weighted"](target=target)
    got = criterion.per_example(model, {**inputs, "labels": labels})
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-10)
    assert (got >= 0).all() and got.sum() > 0
    scores = head_importance(model, [{**inputs, "labels": labels}], "gradient_weighted", target=target, progress=False)
    assert torch.allclose(scores.values, expected.mean(0), rtol=1e-5, atol=1e-12)
