"""Token relevance: hand-computed rollout/GAE/grad x attention/TokenTM, the methods on toy models
(padding, batching, pruning), IG against a manual integral, AttAttr against the slow reference,
and a trained toy where one token decides the label."""

from __future__ import annotations

import math

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.quadrature import quadrature
from attribution.relevance import (
    RELEVANCE_METHODS,
    AttAttrRelevance,
    AttentionRollout,
    GenericAttentionExplainability,
    IntegratedGradientsEmbeddings,
    Random,
    generic_attention_relevance,
    grad_attention_product,
    make_relevance,
    parse_methods,
    rollout,
    token_tm,
    transformation_weights,
)
from tests.conftest import padded_batch, sharp_model, tiny_model
from tests.reference import reference_attattr

FAST_OPTIONS = {"ig": {"n_steps": 8}, "attattr": {"n_steps": 3}}

# ---- a 2-layer toy with fixed attention: T = 3, H = 2 ---------------------------------------

A0 = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # head 0: identity
        [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],  # head 1
    ]
)
A1 = torch.tensor([[[0.0, 1.0, 0.0]] * 3, [[0.0, 1.0, 0.0]] * 3])  # both heads read token 1


def test_rollout_hand_computed():
    # mean_h A0 = [[.5,.25,.25],[.5,.5,0],[.5,0,.5]] -> Â0 = .5 mean + .5 I = [[.75,.125,.125],[.25,.75,0],[.25,0,.75]]
    # Â1 row 0 = .5 [0,1,0] + .5 [1,0,0] = [.5,.5,0];  [CLS] row = .5 Â0[0] + .5 Â0[1] = [.5, .4375, .0625]
    mask = torch.ones(1, 3)
    assert torch.allclose(rollout([A0[None], A1[None]], mask), torch.tensor([[0.5, 0.4375, 0.0625]]))
    # one layer only: just Â0[0]
    assert torch.allclose(rollout([A0[None]], mask), torch.tensor([[0.75, 0.125, 0.125]]))


def test_gae_hand_computed():
    g0 = torch.stack([torch.ones(3, 3), torch.tensor([[0.0, 2.0, -2.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])])
    g1 = torch.stack([torch.full((3, 3), 2.0), torch.full((3, 3), -1.0)])
    # layer 0: (g*A)^+ = I and [[0,1,0],[1,0,0],[0,0,0]] -> Ā0 = [[.5,.5,0],[.5,.5,0],[0,0,.5]]
    #          R = I + Ā0 = [[1.5,.5,0],[.5,1.5,0],[0,0,1.5]]
    # layer 1: (g*A)^+ = rows [0,2,0] and 0 -> Ā1 = rows [0,1,0]; R[0] += R[1] -> [2, 2, 0]
    out = generic_attention_relevance([A0[None], A1[None]], [g0[None], g1[None]], torch.ones(1, 3))
    assert torch.allclose(out, torch.tensor([[2.0, 2.0, 0.0]]))


def test_grad_attention_product_hand_computed():
    a0 = torch.tensor([[[0.5, 0.3, 0.2]] * 3])  # H = 1
    g0 = torch.tensor([[[2.0, 1.0, -1.0]] * 3])  # s = [1, .3, -.2] -> shifted [1.2, .5, 0] + .001 * 1.2
    a1 = torch.tensor([[[0.2, 0.4, 0.4]] * 3])
    g1 = torch.tensor([[[0.0, 2.5, 2.5]] * 3])  # s = [0, 1, 1] -> [0, 1, 1] + .001
    product = torch.tensor([1.2012 * 0.001, 0.5012 * 1.001, 0.0012 * 1.001])
    out = grad_attention_product([a0[None], a1[None]], [g0[None], g1[None]], torch.ones(1, 3), eps=1e-3, signed=True)
    assert torch.allclose(out, (product / product.max())[None], atol=1e-6)
    # magnitudes: layer 0 |s| = [1, .3, .2] -> [.8, .1, 0] + .001 * .8; layer 1 as above
    product = torch.tensor([0.8008 * 0.001, 0.1008 * 1.001, 0.0008 * 1.001])
    out = grad_attention_product([a0[None], a1[None]], [g0[None], g1[None]], torch.ones(1, 3), eps=1e-3)
    assert torch.allclose(out, (product / product.max())[None], atol=1e-6)


def test_token_tm_hand_computed():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, T=2, D=2]
    t = torch.tensor([[[[2.0, 0.0], [0.0, -2.0]]]])  # [B, H=1, T, D]: lengths x2 and x1, cosines +1 and -1
    e = math.e
    necc = [2 * e / (e + 1 / e), 2 * (1 / e) / (e + 1 / e)]
    weights = transformation_weights(x, t, torch.ones(1, 2))
    assert torch.allclose(weights, torch.tensor([[[2 * necc[0], 1 * necc[1]]]]))

    # aggregation: A = all 0.5, grad = 1, W = [2, 1], input lengths [1, 3] -> C0 = diag(.5, 1.5)
    # Ã = [[1, .5], [1, .5]]; C1 = C0 + Ã C0 = [[.5 + .5, .75], ...] -> [CLS] row [1.0, .75]
    a = torch.full((1, 1, 2, 2), 0.5)
    weights = [torch.tensor([[[2.0, 1.0]]])]
    out = token_tm([a], [torch.ones_like(a)], weights, torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    assert torch.allclose(out, torch.tensor([[1.0, 0.75]]))


def test_padding_is_ignored_by_the_pure_rules():
    probs = torch.rand(1, 2, 4, 4)
    probs[..., 3] = 0.0  # a padded key gets no attention
    probs = probs / probs.sum(-1, keepdim=True)
    grads = torch.randn(1, 2, 4, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    for out in (
        rollout([probs, probs], mask),
        generic_attention_relevance([probs], [grads], mask),
        grad_attention_product([probs], [grads], mask),
    ):
        assert out[0, 3] == 0.0 and torch.isfinite(out).all()
    # rollout of the padded example equals rollout of the same example without the padded token
    short = probs[:, :, :3, :3]
    assert torch.allclose(rollout([probs], mask)[:, :3], rollout([short], torch.ones(1, 3)), atol=1e-6)


# ---- the methods on a model with fixed attention ----------------------------------------------


def toy_two_layer():
    return tiny_model("bert", layers=2, heads=2, seed=4)


def test_rollout_and_gae_on_a_model_with_fixed_attention():
    model = toy_two_layer()
    inputs = {"input_ids": torch.tensor([[2, 17, 33]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    fixed = {0: A0[None], 1: A1[None]}

    method = AttentionRollout(model)
    method.fixed_attention = fixed
    assert torch.allclose(method.attribute(inputs), torch.tensor([[0.5, 0.4375, 0.0625]]))

    # GAE: gradients of the target logit at the fixed attention, taken independently here
    target = 1
    leaves = {layer: probs.clone().requires_grad_(True) for layer, probs in fixed.items()}
    with instrument.AttentionProbe(model) as probe:
        probe.replace.update(leaves)
        model(**inputs).logits[0, target].backward()
    relevance = torch.eye(3, dtype=torch.float64)
    for layer in (0, 1):  # explicit loops: R <- R + mean_h (grad * A)^+ R
        a, g = fixed[layer][0].double(), leaves[layer].grad[0].double()
        weights = torch.zeros(3, 3, dtype=torch.float64)
        for h in range(2):
            for i in range(3):
                for j in range(3):
                    weights[i, j] += max(0.0, float(g[h, i, j] * a[h, i, j])) / 2
        relevance = relevance + weights @ relevance
    gae = GenericAttentionExplainability(model)
    gae.fixed_attention = fixed
    assert torch.allclose(gae.attribute(inputs, target=target)[0].double(), relevance[0], atol=1e-6)


def test_head_projections_rebuild_the_attention_output():
    model = tiny_model("bert", layers=2)
    inputs = padded_batch()
    captured = {}
    dense = model.bert.encoder.layer[1].attention.output.dense
    handle = dense.register_forward_hook(lambda module, args, out: captured.setdefault("out", out.detach()))
    try:
        with torch.no_grad(), instrument.AttentionProbe(model, capture=True) as probe:
            model(**inputs)
            probs = probe.attentions[1]
            hidden = instrument.layer_inputs(model, inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        proj = instrument.head_projections(model, 1, hidden[1])
        rebuilt = torch.einsum("bhij,bhjd->bid", probs, proj.transformed) + dense.bias
        scores = proj.scaling * proj.query @ proj.key.transpose(-1, -2)
        scores = scores.masked_fill(inputs["attention_mask"][:, None, None, :] == 0, -1e9)
    assert torch.allclose(rebuilt, captured["out"], atol=1e-5)
    assert torch.allclose(torch.softmax(scores, -1), probs, atol=1e-6)


# ---- every method: shapes, padding, batch == one by one, pruning --------------------------------


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def one_by_one(method, inputs, target):
    rows = []
    width = inputs["input_ids"].shape[1]
    for b in range(inputs["input_ids"].shape[0]):
        n = int(inputs["attention_mask"][b].sum())
        single = {k: v[b : b + 1, :n] for k, v in inputs.items()}
        rows.append(torch.nn.functional.pad(method.attribute(single, target=int(target[b])), (0, width - n)))
    return torch.cat(rows)


@pytest.mark.parametrize("name", list(RELEVANCE_METHODS))
def test_padding_zero_and_batch_equals_one_by_one(model, name):
    inputs = padded_batch(seed=7)
    method = make_relevance(name, model, **FAST_OPTIONS.get(name, {}))
    target = torch.tensor([0, 2, 1])
    batched = method.attribute(inputs, target=target)
    assert batched.shape == inputs["input_ids"].shape and batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    assert (batched[inputs["attention_mask"] == 0] == 0).all()
    assert batched.abs().sum() > 0
    assert torch.allclose(batched, one_by_one(method, inputs, target), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in RELEVANCE_METHODS if n != "random"])
def test_methods_run_on_a_pruned_model(name):
    model = sharp_model()
    instrument.keep_heads_in_layer(model, 1, [])  # a layer with no heads
    instrument.keep_heads_in_layer(model, 2, [0, 3])
    inputs = padded_batch(seed=2)
    out = make_relevance(name, model, **FAST_OPTIONS.get(name, {})).attribute(inputs)
    assert torch.isfinite(out).all() and (out[inputs["attention_mask"] == 0] == 0).all()


def test_gradient_methods_depend_on_the_target(model):
    inputs = padded_batch(seed=3)
    for name in ("gae", "tokentm", "grad_attention"):
        method = make_relevance(name, model)
        assert not torch.allclose(method.attribute(inputs, target=0), method.attribute(inputs, target=1))


def test_integrated_gradients_equal_a_manual_integral(model):
    inputs = padded_batch(seed=4)
    method = IntegratedGradientsEmbeddings(model, n_steps=6, special_ids=[2])
    out = method.attribute(inputs, target=1)
    baseline = method.baseline_ids(inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert torch.equal(baseline, ids.masked_fill((mask == 1) & (ids != 2), 0))  # text -> [PAD], [CLS] kept
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x, x0 = embed(inputs["input_ids"]), embed(baseline)
    alphas, weights = quadrature("gausslegendre", 6)
    total = torch.zeros_like(x)
    for alpha, weight in zip(alphas, weights, strict=True):
        point = (x0 + alpha * (x - x0)).requires_grad_(True)
        probs = torch.softmax(model(inputs_embeds=point, attention_mask=inputs["attention_mask"]).logits, -1)
        (grad,) = torch.autograd.grad(probs[:, 1].sum(), point)
        total += weight * grad
    manual = ((x - x0) * total).sum(-1) * inputs["attention_mask"]
    assert torch.allclose(out, manual, atol=1e-5)
    # completeness: the relevance sums to F(x) - F(baseline), F computed here on the token ids (six
    # Gauss-Legendre nodes integrate this smooth path to ~1e-7, so 1e-5 of gaps of 0.03..0.09 fails
    # on a wrong weight, scale, baseline or path), and captum's delta is what is left over
    with torch.no_grad():
        f_x = torch.softmax(model(**inputs).logits, -1)[:, 1]
        f_0 = torch.softmax(model(input_ids=baseline, attention_mask=mask).logits, -1)[:, 1]
    gap = f_x - f_0
    assert (gap.abs() > 0.02).all()  # a real difference to account for
    torch.testing.assert_close(out.sum(-1), gap, atol=1e-5, rtol=0)
    torch.testing.assert_close(method.last_delta.float(), out.sum(-1) - gap, atol=1e-5, rtol=0)


def test_attattr_relevance_is_the_reference_attribution_summed_over_reads(model):
    inputs = padded_batch(seed=6)
    method = AttAttrRelevance(model, n_steps=3, integration="gausslegendre")
    slow, _ = reference_attattr(model, inputs, n_steps=3, method="gausslegendre")
    expected = slow.sum(dim=(1, 2, 3)).float()  # over layers, heads and queries -> per key
    relevance = method.attribute(inputs)
    assert torch.allclose(relevance, expected, atol=1e-6)
    # completeness, per layer and so in total: sum_j relevance_j = sum_l F(A) - F(A with layer l's
    # attention zeroed), F (the predicted class's probability) computed here with the probe
    with torch.no_grad():
        logits = model(**inputs).logits
        predicted = logits.argmax(-1, keepdim=True)
        f_full = torch.softmax(logits, -1).gather(1, predicted)[:, 0]
        gap = torch.zeros_like(f_full)
        for layer in range(len(instrument.encoder_layers(model))):
            with instrument.AttentionProbe(model, layers=[layer]) as probe:
                probe.replace[layer] = torch.zeros_like
                f_zero = torch.softmax(model(**inputs).logits, -1).gather(1, predicted)[:, 0]
            gap += f_full - f_zero
    assert (gap.abs() > 0.02).all()
    torch.testing.assert_close(relevance.sum(-1), gap, atol=1e-5, rtol=0)


def test_random_is_seeded_per_example(model):
    inputs = padded_batch(seed=8)
    first = Random(model, seed=3).attribute(inputs)
    assert torch.equal(first, Random(model, seed=3).attribute(inputs))
    assert not torch.equal(first, Random(model, seed=4).attribute(inputs))
    reordered = {k: v.flip(0) for k, v in inputs.items()}
    assert torch.equal(Random(model, seed=3).attribute(reordered), first.flip(0))


def test_method_names_and_bad_options(model):
    assert parse_methods("all") == list(RELEVANCE_METHODS)
    assert parse_methods("gae, ig,gae") == ["gae", "ig"]
    with pytest.raises(HeadpruneError, match="unknown relevance method 'lime'"):
        parse_methods("gae,lime")
    with pytest.raises(HeadpruneError, match="bad option"):
        make_relevance("rollout", model, steps=3)
    with pytest.raises(HeadpruneError, match="target classes"):
        make_relevance("gae", model).attribute(padded_batch(), target=7)
    with pytest.raises(HeadpruneError, match="ig integration must be one of .*gausslegendre, got 'gaussradau'"):
        make_relevance("ig", model, integration="gaussradau")


# ---- a tiny model trained so that one token decides the label ---------------------------------

CLS, SEP, NEGATIVE, POSITIVE = 2, 3, 5, 6


def decisive_batch(n: int, seed: int):
    """[CLS] noise... (one of NEGATIVE/POSITIVE at a random place) ...noise [SEP], lengths 6..10."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 10, dtype=torch.long)
    mask = torch.zeros(n, 10, dtype=torch.long)
    labels = torch.randint(0, 2, (n,), generator=generator)
    where = torch.zeros(n, dtype=torch.long)
    for row in range(n):
        length = int(torch.randint(6, 11, (1,), generator=generator))
        ids[row, :length] = torch.randint(10, 60, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = CLS, SEP
        where[row] = int(torch.randint(1, length - 1, (1,), generator=generator))
        ids[row, where[row]] = POSITIVE if labels[row] else NEGATIVE
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}, labels, where


@pytest.fixture(scope="module")
def trained():
    model = tiny_model("bert", layers=2, heads=4, labels=2, seed=0)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(150):
        inputs, labels, _ = decisive_batch(32, seed=100 + step)
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def test_gradient_methods_put_the_deciding_token_first(trained):
    inputs, labels, where = decisive_batch(24, seed=1)
    with torch.no_grad():
        assert (trained(**inputs).logits.argmax(-1) == labels).all(), "the toy did not learn its rule"
    special = (inputs["input_ids"] == CLS) | (inputs["input_ids"] == SEP) | (inputs["attention_mask"] == 0)

    def hits(relevance: torch.Tensor) -> torch.Tensor:
        return relevance.masked_fill(special, -math.inf).argmax(dim=-1) == where

    for name in ("gae", "tokentm", "attattr", "ig", "grad_attention"):
        found = hits(make_relevance(name, trained, **FAST_OPTIONS.get(name, {})).attribute(inputs))
        assert found.all(), f"{name} missed the deciding token in {int((~found).sum())} of 24 examples"
    random_rate = hits(Random(trained, seed=0).attribute(inputs)).float().mean()
    assert random_rate < 0.5
    # Why grad_attention multiplies magnitudes: with signed scores, for one class the [CLS] row's
    # layer-0 score is most *negative* at the deciding token, and the product ranks it last there.
    signed = hits(make_relevance("grad_attention", trained, signed=True).attribute(inputs))
    assert 0 < signed.float().mean() < 1


@pytest.mark.slow
def test_every_method_on_the_real_minilm():
    from attribution.relevance import default_method_options
    from prune.checkpoints import load_model

    torch.manual_seed(0)  # the classification head is freshly initialised
    model, tokenizer = load_model("minilm")
    texts = ["what a wonderful day at the beach", "the train is late again, awful"]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    options = default_method_options(tokenizer, FAST_OPTIONS)
    for name in RELEVANCE_METHODS:
        method = make_relevance(name, model, **options.get(name, {}))
        batched = method.attribute(inputs, target=torch.tensor([1, 0]))  # the fresh head has 2 classes
        assert torch.isfinite(batched).all() and (batched[inputs["attention_mask"] == 0] == 0).all()
        assert torch.allclose(batched, one_by_one(method, inputs, torch.tensor([1, 0])), atol=1e-5, rtol=1e-3), name
