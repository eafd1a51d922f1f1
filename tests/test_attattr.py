"""AttAttr: equality with the slow reference and with captum, completeness, padding, options."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from attribution import AttAttr, instrument
from attribution.core.errors import HeadpruneError
from tests.conftest import FAMILIES, pad_id, padded_batch, sharp_model, tiny_model
from tests.reference import reference_attattr


@pytest.fixture
def bert():
    """Large attributions, so that absolute tolerances of 1e-6 mean something."""
    return sharp_model()


@pytest.fixture
def batch():
    return padded_batch(seed=5)


@pytest.mark.parametrize("integration", ["riemann_right", "riemann_left", "gausslegendre", "gaussradau"])
def test_equals_slow_reference(bert, batch, integration):
    fast, delta = AttAttr(bert).attribute(batch, n_steps=7, integration=integration, return_convergence_delta=True)
    slow, slow_delta = reference_attattr(bert, batch, n_steps=7, method=integration)
    assert fast.shape == (3, 3, 4, 7, 7) and delta.shape == (3, 3)
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta.double(), slow_delta, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_equals_slow_reference_other_families(family):
    model = tiny_model(family)
    batch = padded_batch(pad_id=pad_id(model))
    labels = torch.tensor([0, 2, 1])
    fast = AttAttr(model, output="logit").attribute(batch, target=labels, n_steps=5)
    slow, _ = reference_attattr(model, batch, target=labels, n_steps=5, output="logit")
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "integration", ["riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
)
def test_equals_captum_integrated_gradients(integration):
    """captum's IG of the per-layer function F(A_l) with a zero baseline is AttAttr by definition.

    captum's trapezoid weights sum to (n-1)/n (its alphas are spaced 1/(n-1) but its steps are 1/n);
    ours are the textbook rule, summing to 1, so completeness holds: they differ by that factor.
    """
    bert, batch = sharp_model(), padded_batch(seed=5)
    example = {k: v[1:2, :5] for k, v in batch.items()}  # one example, padding cut
    layer = 1
    with torch.no_grad(), instrument.AttentionProbe(bert, capture=True) as probe:
        logits = bert(**example).logits
        attention = probe.attentions[layer].clone()
    target = int(logits.argmax())

    def forward(scaled_attention: torch.Tensor) -> torch.Tensor:
        rows = scaled_attention.shape[0]
        with instrument.AttentionProbe(bert) as probe:
            probe.replace[layer] = scaled_attention
            out = bert(**{k: v.expand(rows, -1) for k, v in example.items()}).logits
        return torch.softmax(out, dim=-1)[:, target]

    expected = IntegratedGradients(forward).attribute(
        attention, baselines=torch.zeros_like(attention), n_steps=9, method=integration
    )
    if integration == "riemann_trapezoid":
        expected = expected * 9 / 8
    ours = AttAttr(bert).attribute(example, n_steps=9, integration=integration, layers=[layer])
    assert expected.abs().max() > 1e-2  # attributions large enough for the comparison to mean something
    torch.testing.assert_close(ours[0, 0], expected[0].float(), atol=1e-6, rtol=1e-4)


def test_completeness_improves_with_steps_and_gauss_legendre_is_within_one_percent():
    model = sharp_model()
    batch = padded_batch(seed=5)
    explainer = AttAttr(model)
    errors = {}
    for steps in (2, 5, 20):
        _, delta = explainer.attribute(batch, n_steps=steps, return_convergence_delta=True)
        errors[steps] = delta.abs().mean().item()
    assert errors[2] > errors[5] > errors[20]
    attr, delta = explainer.attribute(batch, n_steps=20, integration="gausslegendre", return_convergence_delta=True)
    gap = attr.sum(dim=(2, 3, 4)) - delta  # = F(A) - F(0) per example and layer
    assert gap.abs().min() > 1e-3  # the check below is not vacuous
    assert (delta.abs() <= 0.01 * gap.abs()).all()


def test_row_chunks_are_the_cheapest_cut_into_runs_of_lengths():
    """The calls cost CALL_OVERHEAD_TOKENS each plus rows x longest row: no other way of cutting the
    length-sorted rows into runs (brute force over all of them) is cheaper."""
    import itertools

    from attribution.attattr import CALL_OVERHEAD_TOKENS, TOKENS_PER_CALL, row_chunks

    def cost_of(calls):
        return sum(CALL_OVERHEAD_TOKENS + rows * longest for rows, longest in calls)

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(3, 200, (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator)
        lengths, steps = lengths.tolist(), int(torch.randint(1, 8, (1,), generator=generator))
        chosen = cost_of((len(ex), length) for ex, _, length in row_chunks(lengths, steps, None, torch.device("cpu")))
        classes = sorted(set(lengths))
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=len(classes) - 1):
            runs, run = [], [classes[0]]
            for length, cut in zip(classes[1:], cuts, strict=True):
                if cut:
                    runs.append(run)
                    run = []
                run.append(length)
            runs.append(run)
            total = 0
            for run in runs:
                rows = steps * sum(lengths.count(length) for length in run)
                per_call = max(1, TOKENS_PER_CALL // run[-1])
                calls = -(-rows // per_call)
                total += calls * CALL_OVERHEAD_TOKENS + rows * run[-1]
            best = min(best, total)
        assert chosen <= best


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_quadrature_rules_integrate_polynomials_exactly_to_their_degree(m):
    from attribution.quadrature import quadrature

    for integration, degree in (("gausslegendre", 2 * m - 1), ("gaussradau", 2 * m - 2)):
        alphas, weights = quadrature(integration, m)
        assert len(alphas) == m and all(0.0 <= a <= 1.0 for a in alphas)
        moments = [sum(w * a**d for a, w in zip(alphas, weights, strict=True)) for d in range(degree + 2)]
        for d in range(degree + 1):
            assert moments[d] == pytest.approx(1 / (d + 1), abs=1e-12), (integration, d)
        assert abs(moments[degree + 1] - 1 / (degree + 2)) > 1e-11  # and no further
    assert quadrature("gaussradau", m)[0][-1] == 1.0  # exactly, so AttAttr takes it from the unscaled pass


def test_node_at_one_from_the_unscaled_pass_equals_a_scaled_pass(bert, batch):
    """A node at alpha = 1 comes from one backward pass through the unscaled model for all layers;
    the reference computes it per layer with a scaled pass. Alone (one Radau node: gradient x
    attention) and within riemann_right, both agree."""
    explainer = AttAttr(bert)
    right = explainer.attribute(batch, n_steps=4, integration="riemann_right")  # 0.25, 0.5, 0.75, 1
    slow_right, _ = reference_attattr(bert, batch, n_steps=4, method="riemann_right")
    torch.testing.assert_close(right.double(), slow_right, atol=1e-6, rtol=0)
    single = explainer.attribute(batch, n_steps=1, integration="gaussradau")  # the alpha = 1 node alone
    slow_single, _ = reference_attattr(bert, batch, n_steps=1, method="gaussradau")
    assert slow_single.abs().max() > 1e-2
    torch.testing.assert_close(single.double(), slow_single, atol=1e-6, rtol=0)


def test_example_alone_equals_example_in_padded_batch(bert, batch):
    together = AttAttr(bert).attribute(batch, n_steps=5)
    for row in range(3):
        n = int(batch["attention_mask"][row].sum())
        alone = AttAttr(bert).attribute({k: v[row : row + 1, :n] for k, v in batch.items()}, n_steps=5)
        torch.testing.assert_close(together[row, :, :, :n, :n], alone[0], atol=1e-6, rtol=0)
        assert together[row, :, :, n:, :].abs().sum() == 0  # padding rows exactly zero
        assert together[row, :, :, :, n:].abs().sum() == 0  # padding columns exactly zero


def test_internal_batch_size_and_layer_selection_do_not_change_results(bert, batch):
    explainer = AttAttr(bert)
    full = explainer.attribute(batch, n_steps=6)
    chunked = explainer.attribute(batch, n_steps=6, internal_batch_size=4)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    some = explainer.attribute(batch, n_steps=6, layers=[2, 0])
    torch.testing.assert_close(some, full[:, [2, 0]], atol=1e-6, rtol=0)


def test_targets_and_outputs(bert, batch):
    explainer = AttAttr(bert)
    logits = bert(**batch).logits
    predicted = explainer.attribute(batch, n_steps=4)
    explicit = explainer.attribute(batch, target=logits.argmax(-1), n_steps=4)
    torch.testing.assert_close(predicted, explicit)
    _, delta = AttAttr(bert, output="loss").attribute(
        batch, target=torch.tensor([0, 1, 2]), n_steps=4, return_convergence_delta=True
    )
    assert delta.shape == (3, 3)
    with pytest.raises(HeadpruneError, match="target classes"):
        explainer.attribute(batch, target=7)
    with pytest.raises(HeadpruneError, match="unknown output"):
        AttAttr(bert, output="margin")
    with pytest.raises(HeadpruneError, match="unknown integration method"):
        explainer.attribute(batch, integration="simpson")
    with pytest.raises(HeadpruneError, match="layers must lie"):
        explainer.attribute(batch, layers=[3])
    with pytest.raises(HeadpruneError, match="tokenizer batch"):
        explainer.attribute({"ids": batch["input_ids"]})


def test_model_state_is_restored(bert, batch):
    bert.train()
    AttAttr(bert).attribute(batch, n_steps=2)
    assert bert.training
    assert all(p.requires_grad for p in bert.parameters())
    assert all(p.grad is None for p in bert.parameters())
    assert bert.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_family_runs(family):
    model = tiny_model(family)
    attr, delta = AttAttr(model).attribute(padded_batch(pad_id=pad_id(model)), n_steps=3, return_convergence_delta=True)
    assert attr.shape == (3, 3, 4, 7, 7) and torch.isfinite(attr).all() and torch.isfinite(delta).all()


def test_masked_model_equals_reference_and_pruned_model_equals_masked():
    """Persistent head masks are part of F; a physically pruned model gives the masked model's
    attributions for its surviving heads and exact zeros for removed ones."""
    masked, pruned = sharp_model(), sharp_model()
    batch = padded_batch(seed=5)
    keep = {0: [0, 2, 3], 1: [1], 2: []}
    instrument.set_head_mask(
        masked, [torch.tensor([1.0 if h in keep[layer] else 0.0 for h in range(4)]) for layer in range(3)]
    )
    for layer, heads in keep.items():
        instrument.keep_heads_in_layer(pruned, layer, heads)
    ours, delta = AttAttr(masked).attribute(batch, n_steps=5, return_convergence_delta=True)
    slow, slow_delta = reference_attattr(masked, batch, n_steps=5)
    torch.testing.assert_close(ours.double(), slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta.double(), slow_delta, atol=1e-5, rtol=0)
    removed, removed_delta = AttAttr(pruned).attribute(batch, n_steps=5, return_convergence_delta=True)
    for layer, heads in keep.items():
        gone = [h for h in range(4) if h not in heads]
        torch.testing.assert_close(removed[:, layer, heads], ours[:, layer, heads], atol=1e-6, rtol=0)
        assert removed[:, layer, gone].abs().sum() == 0
    assert removed_delta[:, 2].abs().sum() == 0  # a layer with no heads: nothing to attribute, F(0) = F(A)


@pytest.mark.parametrize("integration", ["gausslegendre", "gaussradau"])  # Radau: its node at 1 under autocast too
def test_bfloat16_autocast_is_close_and_its_cost_shows_in_the_delta(bert, batch, integration):
    explainer = AttAttr(bert)
    exact, exact_delta = explainer.attribute(batch, n_steps=6, integration=integration, return_convergence_delta=True)
    low, low_delta = explainer.attribute(
        batch, n_steps=6, integration=integration, return_convergence_delta=True, autocast_dtype=torch.bfloat16
    )
    assert low.dtype == torch.float32
    assert (low - exact).abs().max() <= 0.1 * exact.abs().max()
    assert low_delta.abs().max() > 10 * exact_delta.abs().max()  # what bf16 cost is visible


def test_accepts_a_tokenizer_batch_encoding(bert, batch):
    from transformers import BatchEncoding

    torch.testing.assert_close(
        AttAttr(bert).attribute(BatchEncoding(batch), n_steps=3), AttAttr(bert).attribute(batch, n_steps=3)
    )


@pytest.mark.parametrize("max_rows", [None, 1, 5])
def test_row_chunks_cover_every_row_once_within_budget(max_rows):
    from attribution.attattr import TOKENS_PER_CALL, row_chunks

    lengths = [7, 300, 12, 3, 3, 900, 64]
    seen = []
    for examples, steps, length in row_chunks(lengths, 4, max_rows, torch.device("cpu")):
        assert length == max(lengths[b] for b in examples.tolist())
        if max_rows:
            assert len(examples) <= max_rows
        else:
            assert len(examples) == 1 or len(examples) * length <= TOKENS_PER_CALL
        seen += list(zip(examples.tolist(), steps.tolist(), strict=True))
    assert sorted(seen) == [(b, k) for b in range(7) for k in range(4)]
