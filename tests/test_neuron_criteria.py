"""Neuron criteria and gate integrated gradients: equality with slow per-example references and
with captum, completeness per layer, one accumulator for heads and neurons, NeuronScores files."""

from __future__ import annotations

import json

import pytest
import torch
from captum.attr import IntegratedGradients

from attribution import instrument
from attribution.attattr import AttAttr
from attribution.core.errors import HeadpruneError
from attribution.criteria import (
    CRITERIA,
    NEURON_CRITERIA,
    NeuronFisherCriterion,
    ScoreAccumulator,
    ScorePartial,
    finalize_scores,
    gate_attributions,
    head_importance,
    make_criterion,
    neuron_importance,
)
from attribution.scores import HeadScores, NeuronScores
from tests.conftest import pad_id, padded_batch, tiny_model
from tests.prune_helpers import sensitive

WIDTH = 37  # the tiny models' intermediate size


def model_of(family: str = "bert", seed: int = 0):
    """A tiny classifier with weights spread wide enough that every head and neuron moves F
    nonlinearly (so quadrature errors and wrong gradients show)."""
    return sensitive(tiny_model(family, seed=seed), seed=seed, std=0.25)


def labelled_batch(model, batch: int = 4, seed: int = 2):
    data = padded_batch(batch=batch, seed=seed, pad_id=pad_id(model))
    data["labels"] = torch.arange(batch) % 3
    return data


def ffn_layers(model):
    return model.distilbert.transformer.layer if model.config.model_type == "distilbert" else model.bert.encoder.layer


def gate_hook(model, layer_module, gate):
    """Multiply the feed-forward activation output by ``gate``: hooked on the whole intermediate
    block in BERT (its output is act(W1 x + b1)), on the input of lin2 in DistilBERT (not on the
    activation module the library hooks)."""
    if model.config.model_type == "distilbert":
        return layer_module.ffn.lin2.register_forward_pre_hook(lambda m, args: (args[0] * gate,))
    return layer_module.intermediate.register_forward_hook(lambda m, args, out: out * gate)


def slow_neuron_gradients(model, batch):
    """Per example, alone and unpadded: dL/dxi for every neuron, L the cross-entropy of the label."""
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        one = {k: v[row : row + 1, :n] for k, v in batch.items() if k != "labels"}
        gates = [torch.ones(WIDTH, requires_grad=True) for _ in ffn_layers(model)]
        handles = [gate_hook(model, layer, gate) for layer, gate in zip(ffn_layers(model), gates, strict=True)]
        try:
            loss = torch.nn.functional.cross_entropy(model(**one).logits, batch["labels"][row : row + 1])
            rows.append(torch.stack(torch.autograd.grad(loss, gates)))
        finally:
            for handle in handles:
                handle.remove()
    return torch.stack(rows).double()  # [B, L, F]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_neuron_taylor_and_fisher_equal_per_example_slow_gradients(family):
    model = model_of(family)
    batch = labelled_batch(model)
    grads = slow_neuron_gradients(model, batch)
    assert grads.abs().max() > 1e-3  # gradients large enough for the comparison to mean something
    taylor = neuron_importance(model, [batch], "taylor", normalize=False, progress=False)
    fisher = neuron_importance(model, [batch], "fisher", progress=False)
    assert isinstance(taylor, NeuronScores) and taylor.shape == (3, WIDTH)
    torch.testing.assert_close(taylor.values, grads.abs().mean(0), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fisher.values, grads.square().sum(0), atol=1e-8, rtol=1e-4)
    normalized = neuron_importance(model, [batch], "taylor", progress=False)
    torch.testing.assert_close(normalized.values.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_pruned_neurons_score_zero_and_keep_their_original_indices():
    """A model with neurons sliced out (one layer emptied) scores like the dense model with those
    neurons masked to 0, at the same original indices, and its removed neurons score 0."""
    model, dense = model_of(seed=1), model_of(seed=1)
    keep = [list(range(0, WIDTH, 2)), [], list(range(5, 30))]
    for layer, neurons in enumerate(keep):
        instrument.keep_neurons_in_layer(model, layer, neurons)
    masks = [torch.zeros(WIDTH).index_fill_(0, torch.tensor(k, dtype=torch.long), 1.0) for k in keep]
    instrument.set_neuron_mask(dense, masks)
    batch = labelled_batch(model)
    removed = torch.stack(masks) == 0
    for name in ("fisher", "gate_ig", "magnitude"):
        pruned = neuron_importance(model, [batch], name, progress=False)
        masked = neuron_importance(dense, [batch], name, progress=False)
        assert (pruned.values[removed] == 0).all(), name
        assert pruned.values[~removed].abs().max() > 0, name
        torch.testing.assert_close(pruned.values, masked.values.masked_fill(removed, 0.0), atol=1e-7, rtol=1e-4)
    scores = neuron_importance(model, [batch], "fisher", progress=False)
    assert scores.provenance["neurons_per_layer"] == [len(k) for k in keep]
    assert scores.provenance["removed_neurons"][1] == list(range(WIDTH))


def test_magnitude_is_the_product_of_input_row_and_output_column_norms():
    model = model_of("distilbert", seed=3)
    scores = neuron_importance(model, [], "magnitude", progress=False)
    for layer, block in enumerate(model.distilbert.transformer.layer):
        expected = block.ffn.lin1.weight.double().norm(dim=1) * block.ffn.lin2.weight.double().norm(dim=0)
        torch.testing.assert_close(scores.values[layer], expected.detach())
    assert scores.provenance["examples"] == 0 and not NEURON_CRITERIA["magnitude"].needs_data


def test_neuron_random_is_seeded():
    model = model_of()
    first = neuron_importance(model, [], "random", seed=4, progress=False)
    again = neuron_importance(model, [], "random", seed=4, progress=False)
    other = neuron_importance(model, [], "random", seed=5, progress=False)
    assert first.shape == (3, WIDTH)
    assert torch.equal(first.values, again.values) and not torch.equal(first.values, other.values)


# ---- gate integrated gradients ----------------------------------------------------------------


def probe_for(unit: str, model):
    return instrument.AttentionProbe(model) if unit == "head" else instrument.NeuronProbe(model)


def target_probability(model, batch, unit: str | None = None, layer: int | None = None, gate=None) -> torch.Tensor:
    """F per example through the plain full model (no fast path), optionally with one layer gated."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        target = model(**inputs).logits.argmax(-1)
        if unit is None:
            logits = model(**inputs).logits
        else:
            with probe_for(unit, model) as probe:
                probe.gates[layer] = gate
                logits = model(**inputs).logits
    return torch.softmax(logits.double(), -1).gather(1, target[:, None])[:, 0]


def completeness_errors(model, batch, unit, result) -> torch.Tensor:
    """``|sum_u Attr_u - (F(1) - F(0))| / |F(1) - F(0)|`` ``[B, L]`` with F(1) and F(0) computed
    independently (the plain model, one layer's gates at 0)."""
    full = target_probability(model, batch)
    sizes = instrument.heads_per_layer(model) if unit == "head" else instrument.neurons_per_layer(model)
    errors = []
    for layer, size in enumerate(sizes):
        baseline = target_probability(model, batch, unit, layer, torch.zeros(size))
        gap = full - baseline
        assert gap.abs().min() > 1e-3  # removing a layer's units moves F: the check is not vacuous
        errors.append((result.attributions[:, layer].sum(-1) - gap).abs() / gap.abs())
    return torch.stack(errors, dim=1)


@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_gate_ig_completeness_holds_and_a_broken_rule_fails_it(unit, monkeypatch):
    """This model is far from linear in the gates (a 20-step Riemann sum misses by several percent),
    so completeness is reached only as the rule converges: a 16-node Gauss-Legendre rule is exact
    to float32 rounding here."""
    model = model_of(seed=2)
    batch = padded_batch(batch=3, seed=4)
    errors = {}
    for integration, steps in (("riemann_right", 4), ("riemann_right", 20), ("gausslegendre", 16)):
        result = gate_attributions(model, batch, unit, n_steps=steps, integration=integration)
        errors[integration, steps] = completeness_errors(model, batch, unit, result)
        # the delta it reports is the independent one
        torch.testing.assert_close(result.relative_error(), errors[integration, steps], atol=1e-4, rtol=1e-3)
    medians = {key: float(value.median()) for key, value in errors.items()}
    assert medians["riemann_right", 4] > medians["riemann_right", 20] > 0.01
    assert errors["gausslegendre", 16].max() < 1e-4

    # A plausible bug: dropping the rule's last node (Gauss-Radau's shared node at alpha = 1).
    from attribution.criteria import gate_ig
    from attribution.quadrature import quadrature

    def without_last_node(integration, n_steps):
        alphas, weights = quadrature(integration, n_steps)
        return alphas[:-1], weights[:-1]

    monkeypatch.setattr(gate_ig, "quadrature", without_last_node)
    broken = gate_attributions(model, batch, unit, n_steps=16, integration="gausslegendre")
    assert completeness_errors(model, batch, unit, broken).median() > 1e-3


@pytest.mark.parametrize("unit", ["head", "neuron"])
@pytest.mark.parametrize(("integration", "steps"), [("gausslegendre", 4), ("riemann_right", 5)])
def test_gate_ig_equals_captum_over_each_layers_gate_vector(unit, integration, steps):
    """captum's IG of F(g_l) from g_l = 0 to 1, the full model run on padded rows: the same numbers
    (riemann_right has a node at 1, which the fast path shares across layers)."""
    model = model_of("distilbert" if unit == "neuron" else "bert", seed=4)
    batch = padded_batch(batch=3, seed=6, pad_id=pad_id(model))
    result = gate_attributions(model, batch, unit, n_steps=steps, integration=integration)
    with torch.no_grad():
        target = model(**batch).logits.argmax(-1)
    sizes = instrument.heads_per_layer(model) if unit == "head" else instrument.neurons_per_layer(model)
    for layer, size in enumerate(sizes):

        def forward(gates, input_ids, attention_mask, layer=layer):
            with probe_for(unit, model) as probe:
                probe.gates[layer] = gates
                return torch.softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits, -1)

        ones = torch.ones(3, size)
        expected = IntegratedGradients(forward).attribute(
            ones, baselines=torch.zeros_like(ones), target=target, n_steps=steps, method=integration,
            additional_forward_args=(batch["input_ids"], batch["attention_mask"]),
        )  # fmt: skip
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(result.attributions[:, layer], expected.double(), atol=1e-6, rtol=0)


def test_head_gate_ig_is_attattr_summed_over_token_pairs():
    """Scaling a head's gate by alpha scales A_h V_h as scaling A_h does: the two attributions agree
    after summing AttAttr's over the pairs (two independent implementations)."""
    model = model_of(seed=5)
    batch = padded_batch(batch=3, seed=7)
    ours = gate_attributions(model, batch, "head", n_steps=3, integration="gaussradau")
    attattr = AttAttr(model).attribute(batch, n_steps=3, integration="gaussradau")
    torch.testing.assert_close(ours.attributions, attattr.sum(dim=(-1, -2)).double(), atol=1e-6, rtol=1e-5)


def test_gate_ig_criteria_scores_targets_and_diagnostics():
    model = model_of(seed=6)
    batch = labelled_batch(model, batch=3, seed=3)
    gold = gate_attributions(model, batch, "neuron", target=batch["labels"], n_steps=3)
    scores = neuron_importance(model, [batch], "gate_ig", target="gold", progress=False)
    torch.testing.assert_close(scores.values, gold.attributions.mean(0))
    absolute = neuron_importance(model, [batch], "gate_ig", target="gold", absolute=True, progress=False)
    torch.testing.assert_close(absolute.values, gold.attributions.abs().mean(0))
    errors = gold.relative_error().flatten().double()
    summary = scores.provenance["relative_completeness_error"]
    assert summary["median"] == pytest.approx(float(errors.median()), rel=1e-6, abs=1e-9)
    assert summary["p90"] == pytest.approx(float(torch.quantile(errors, 0.9)), rel=1e-6, abs=1e-9)
    heads = head_importance(model, [batch], "gate_ig", progress=False)
    assert isinstance(heads, HeadScores) and heads.shape == (3, 4) and "relative_completeness_error" in heads.provenance
    with pytest.raises(HeadpruneError, match="gate_ig with target='gold' needs labels"):
        neuron_importance(model, [{k: v for k, v in batch.items() if k != "labels"}], "gate_ig", target="gold")


# ---- one framework for every unit -------------------------------------------------------------


def test_registries_by_unit_and_one_line_errors():
    assert {"taylor", "fisher", "magnitude", "random", "gate_ig"} <= set(NEURON_CRITERIA)
    assert "gate_ig" in CRITERIA and "magnitude" not in CRITERIA
    assert all(cls.unit == "neuron" for cls in NEURON_CRITERIA.values())
    assert all(cls.unit == "head" for cls in CRITERIA.values())
    assert list(CRITERIA)[:5] == ["attattr", "taylor", "fisher", "attention", "random"]  # unchanged for the CLI
    for name, cls in NEURON_CRITERIA.items():
        criterion = cls()
        assert make_criterion(name, unit="neuron", **criterion.options()).options() == criterion.options()
    model = model_of()
    cases = [
        (lambda: make_criterion("magnitude"), "unknown criterion 'magnitude'; choose one of attattr"),
        (lambda: make_criterion("attattr", unit="neuron"), "unknown neuron criterion 'attattr'; choose one of taylor"),
        (lambda: make_criterion("fisher", unit="layer"), "unknown unit 'layer'; choose one of head, neuron"),
        (lambda: head_importance(model, [], NeuronFisherCriterion()), "criterion 'fisher' scores neurons, not heads"),
        (lambda: neuron_importance(model, [], "fisher", progress=False), "no examples to score neurons on"),
        (lambda: neuron_importance(model, [], "gate_ig", n_steps=0), "gate_ig option n_steps: got 0; expected a pos"),
    ]
    for call, message in cases:
        with pytest.raises(HeadpruneError) as caught:
            call()
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def _shards(batch, cuts):
    return [[{k: v[a:b] for k, v in batch.items()} for a, b in shard] for shard in cuts]


@pytest.mark.parametrize("name", ["fisher", "gate_ig"])
def test_accumulated_neuron_shards_merged_equal_one_pass_bit_for_bit(name, tmp_path):
    model = model_of(seed=7)
    batch = labelled_batch(model, batch=5, seed=4)
    shards = _shards(batch, [[(0, 1), (1, 2)], [(2, 4)], [(4, 5)]])
    partials = []
    for k, shard in enumerate(shards):
        accumulator = ScoreAccumulator(make_criterion(name, unit="neuron"), model)
        assert accumulator.shape == (3, WIDTH)
        for part in shard:
            accumulator.update(part)
        accumulator.partial().save(tmp_path / f"shard-{k}.pt", fingerprint="fp")
        partials.append(ScorePartial.load(tmp_path / f"shard-{k}.pt"))
    merged = ScorePartial.merge(partials)
    from_shards = finalize_scores(make_criterion(name, unit="neuron"), model, merged)
    one_pass = neuron_importance(model, [b for shard in shards for b in shard], name, progress=False)
    assert isinstance(from_shards, NeuronScores) and merged.count == 5
    assert torch.equal(from_shards.values, one_pass.values)
    if name == "gate_ig":
        assert merged.diagnostics["relative_completeness_error"].shape == (5, 3)  # [examples, layers]
        key = "relative_completeness_error"
        assert from_shards.provenance[key] == one_pass.provenance[key]


def test_score_dataset_scores_neurons_like_neuron_importance(tmp_path):
    from attribution.core.data import iter_batches
    from attribution.criteria import score_dataset
    from tests.prune_helpers import tiny_dataset, tiny_tokenizer

    model, tokenizer, data = model_of(seed=8), tiny_tokenizer(tmp_path / "tok"), tiny_dataset(6, seed=1)
    scores = score_dataset(model, tokenizer, data, "gate_ig", unit="neuron", batch_size=3, progress=False)
    batches = [{k: v for k, v in b.items() if k != "index"} for b in iter_batches(data, tokenizer, batch_size=3)]
    expected = neuron_importance(model, batches, "gate_ig", progress=False)
    assert isinstance(scores, NeuronScores) and scores.provenance["examples"] == 6
    torch.testing.assert_close(scores.values, expected.values, atol=1e-9, rtol=1e-6)
    assert scores.provenance["relative_completeness_error"] == expected.provenance["relative_completeness_error"]


# ---- NeuronScores files -----------------------------------------------------------------------


def test_neuron_scores_round_trip_rank_and_plot(tmp_path):
    values = torch.tensor([[0.1, 0.9, 0.3, 0.0], [0.5, -0.2, 0.9, 0.2]])
    scores = NeuronScores(values, "fisher", {"model": "tiny", "removed_neurons": [[3], []]})
    assert scores.ranking()[:3] == [(0, 1), (1, 2), (1, 0)]  # tie 0.9/0.9 broken by position
    assert scores.ranks()[1, 1] == 7 and str(scores).startswith("NeuronScores(fisher, 2x4, top: L0N1, L1N2")
    path = scores.save(tmp_path / "neurons.json")
    data = json.loads(path.read_text())
    assert data["format"] == "headprune.NeuronScores" and data["version"] == 1 and data["shape"] == [2, 4]
    loaded = NeuronScores.load(path)
    assert torch.equal(loaded.values, scores.values) and loaded.provenance == scores.provenance
    assert loaded.criterion == "fisher" and loaded.spearman(scores) == pytest.approx(1.0)
    assert isinstance(scores.normalized(), NeuronScores)
    wide = NeuronScores(torch.rand(3, 300, generator=torch.Generator().manual_seed(0)), "random")
    wide.plot(tmp_path / "neurons.png")
    assert (tmp_path / "neurons.png").read_bytes()[:4] == b"\x89PNG"


V1 = '{"format": "headprune.NeuronScores", "version": 1, "criterion": "x", '


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[1, 2]", "not a headprune NeuronScores file (found no headprune file)"),
        ('{"format": "headprune.HeadScores", "version": 2}', "NeuronScores file (found a headprune.HeadScores"),
        ('{"format": "headprune.NeuronScores", "version": 2, "criterion": "x", "values": [[1]]}', "version 2 is newer"),
        ('{"format": "headprune.NeuronScores", "version": 1, "values": [[1]]}', "criterion: expected the criterion"),
        (V1 + '"values": 3}', "values: expected an [layers, neurons] matrix"),
        (V1 + '"values": [[1, 2], [3]]}', "ragged matrix (row 0 has 2 neurons, row 1 has 1)"),
        (V1 + '"values": [[1, "a"]]}', "values[0][1]"),
        (V1 + '"values": [[1]], "shape": [2, 1]}', "shape says [2, 1]"),
        (V1 + '"values": [[1]], "provenance": [1]}', "provenance: expected a mapping"),
    ],
)
def test_corrupt_neuron_scores_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "neurons.json"
    path.write_text(text)
    with pytest.raises(HeadpruneError) as caught:
        NeuronScores.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_head_scores_files_are_unchanged(tmp_path):
    """The common base changed nothing of a HeadScores file: the same keys in the same order, the
    same values; and a HeadScores file is not a NeuronScores one (nor the other way round)."""
    scores = HeadScores(torch.tensor([[0.5, 0.25]]), "attattr", {"examples": 2, "kept_heads": [[0, 1]]})
    path = scores.save(tmp_path / "heads.json")
    assert json.loads(path.read_text()) == {
        "format": "headprune.HeadScores", "version": 2, "criterion": "attattr", "shape": [1, 2],
        "values": [[0.5, 0.25]], "provenance": {"examples": 2, "kept_heads": [[0, 1]]},
    }  # fmt: skip
    assert list(json.loads(path.read_text())) == ["format", "version", "criterion", "shape", "values", "provenance"]
    assert str(HeadScores.load(path)) == "HeadScores(attattr, 1x2, top: L0H0, L0H1)"
    with pytest.raises(HeadpruneError, match="not a headprune NeuronScores file"):
        NeuronScores.load(path)
    NeuronScores(torch.ones(1, 2), "fisher").save(tmp_path / "neurons.json")
    with pytest.raises(HeadpruneError, match="not a headprune HeadScores file"):
        HeadScores.load(tmp_path / "neurons.json")
