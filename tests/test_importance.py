"""Head-importance criteria (objects, options, the score accumulator), HeadScores persistence and ranking."""

from __future__ import annotations

import json
import os

import pytest
import torch

from attribution import CRITERIA, HeadScores, head_importance, instrument
from attribution.core.errors import HeadpruneError
from attribution.criteria import (
    Criterion,
    CriterionOption,
    ScoreAccumulator,
    ScorePartial,
    TaylorCriterion,
    finalize_scores,
    make_criterion,
    register_criterion,
)
from tests.conftest import padded_batch, sharp_model

DECISION_HEAD = (1, 2)


def decisive_model(seed: int):
    """A tiny BERT whose head (1, 2) carries the decision: its output projection is amplified and
    every other head's is shrunk tenfold (but not removed)."""
    model = sharp_model(seed=seed)
    with torch.no_grad():
        for layer_index, layer in enumerate(model.bert.encoder.layer):
            weight = layer.attention.output.dense.weight
            for head in range(4):
                scale = 3.0 if (layer_index, head) == DECISION_HEAD else 0.1
                weight[:, 8 * head : 8 * head + 8] *= scale
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("criterion", ["attattr", "taylor", "fisher"])
def test_designed_decision_head_ranks_first(criterion, seed):
    model = decisive_model(seed)
    batch = padded_batch(batch=6, seed=seed)
    batch["labels"] = model(**batch).logits.argmax(-1)
    options = {"n_steps": 8} if criterion == "attattr" else {}
    scores = head_importance(model, [batch], criterion, progress=False, **options)
    assert scores.top(1) == [DECISION_HEAD]


def slow_gate_gradients(model, batch):
    """Per example, alone and unpadded: dL/dxi for every head, L the cross-entropy."""
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        one = {k: v[row : row + 1, :n] for k, v in batch.items() if k != "labels"}
        gates = [torch.ones(4, requires_grad=True) for _ in range(3)]
        with instrument.AttentionProbe(model) as probe:
            probe.gates.update(dict(enumerate(gates)))
            loss = torch.nn.functional.cross_entropy(model(**one).logits, batch["labels"][row : row + 1])
            grads = torch.autograd.grad(loss, gates)
        rows.append(torch.stack(grads))
    return torch.stack(rows).double()  # [B, L, H]


def test_taylor_and_fisher_equal_per_example_slow_gradients():
    model = sharp_model()
    batch = padded_batch(batch=4, seed=2)
    batch["labels"] = torch.tensor([0, 1, 2, 1])
    grads = slow_gate_gradients(model, batch)
    taylor = head_importance(model, [batch], "taylor", normalize=False, progress=False)
    fisher = head_importance(model, [batch], "fisher", progress=False)
    torch.testing.assert_close(taylor.values, grads.abs().mean(0), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fisher.values, grads.square().sum(0), atol=1e-8, rtol=1e-4)
    normalized = head_importance(model, [batch], "taylor", progress=False)
    torch.testing.assert_close(normalized.values.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_attattr_scores_are_mean_of_signed_max_over_valid_pairs():
    from attribution import AttAttr

    model = sharp_model()
    batch = padded_batch(batch=4, seed=7)
    attr = AttAttr(model).attribute(batch, n_steps=5)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        expected += attr[row, :, :, :n, :n].flatten(2).max(-1).values.double()
    # two batches, the second split off, so the streamed reduction is exercised
    batches = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    scores = head_importance(model, batches, "attattr", n_steps=5, progress=False)
    torch.testing.assert_close(scores.values, expected / 4, atol=1e-6, rtol=0)
    assert scores.provenance["examples"] == 4
    assert scores.provenance["relative_completeness_error"]["median"] >= 0


def test_attention_criterion_and_max_examples():
    model = sharp_model()
    batch = padded_batch(batch=4, seed=7)
    with instrument.AttentionProbe(model, capture=True) as probe:
        model(**batch)
        attentions = dict(probe.attentions)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for row in range(3):  # max_examples=3 below: the 4th example must not count
        n = int(batch["attention_mask"][row].sum())
        for layer in range(3):
            expected[layer] += attentions[layer][row, :, :n, :n].flatten(1).max(-1).values.double()
    scores = head_importance(model, [batch], "attention", max_examples=3, progress=False)
    torch.testing.assert_close(scores.values, expected / 3, atol=1e-6, rtol=0)


def test_random_is_seeded():
    model = sharp_model()
    first = head_importance(model, [], "random", seed=4, progress=False)
    again = head_importance(model, [], "random", seed=4, progress=False)
    other = head_importance(model, [], "random", seed=5, progress=False)
    assert torch.equal(first.values, again.values) and not torch.equal(first.values, other.values)


def test_bad_criteria_and_options_are_one_line_errors():
    model = sharp_model()
    with pytest.raises(HeadpruneError, match="unknown criterion 'magic'"):
        head_importance(model, [], "magic")
    with pytest.raises(HeadpruneError, match="taylor option steps: not an option of taylor .its options: normalize"):
        head_importance(model, [], "taylor", steps=3)
    with pytest.raises(HeadpruneError, match="no examples"):
        head_importance(model, [], "taylor", progress=False)
    cases = [
        ({"n_steps": 0}, "attattr option n_steps: got 0; expected a positive integer"),
        ({"n_steps": True}, "attattr option n_steps: got True; expected a positive integer"),
        ({"integration": "simpson"}, "attattr option integration: got 'simpson'; expected one of: riemann_right"),
        ({"method": "gausslegendre"}, "attattr option method: renamed to integration"),
        ({"target": "gold!"}, "attattr option target: got 'gold!'; expected one of: predicted, gold"),
        ({"n_steps": 1, "integration": "riemann_trapezoid"}, "attattr option n_steps: got 1; expected an integer >= 2"),
    ]
    for options, message in cases:
        with pytest.raises(HeadpruneError) as caught:
            make_criterion("attattr", **options)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    with pytest.raises(HeadpruneError, match="taylor option normalize: got 'yes'; expected true or false"):
        TaylorCriterion(normalize="yes")
    with pytest.raises(HeadpruneError, match="options .n_steps. go with a criterion name"):
        head_importance(model, [], TaylorCriterion(), n_steps=3)
    with pytest.raises(HeadpruneError, match="method was renamed to criterion: criterion='taylor'"):
        head_importance(model, [], method="taylor")
    assert list(CRITERIA)[:5] == ["attattr", "taylor", "fisher", "attention", "random"]


def test_criterion_by_keyword_by_object_and_by_name_agree():
    """``criterion=`` is a keyword like any other (no positional-only hack) and takes an object."""
    model = sharp_model()
    batch = padded_batch(batch=4, seed=2)
    by_name = head_importance(model, [batch], "taylor", normalize=False, progress=False)
    by_keyword = head_importance(model, [batch], criterion="taylor", normalize=False, progress=False)
    by_object = head_importance(model, [batch], criterion=TaylorCriterion(normalize=False), progress=False)
    assert torch.equal(by_name.values, by_keyword.values) and torch.equal(by_name.values, by_object.values)
    assert by_object.criterion == "taylor" and by_object.provenance["options"] == {"normalize": False}
    attattr = head_importance(model, [batch], criterion="attattr", n_steps=3, integration="gaussradau", progress=False)
    assert attattr.provenance["options"] == {
        "n_steps": 3, "integration": "gaussradau", "output": "probability", "target": "predicted"
    }  # fmt: skip


def test_every_criterion_declares_its_options():
    for name, cls in CRITERIA.items():
        spec = cls.option_spec()
        assert all(isinstance(o, CriterionOption) and o.name == key for key, o in spec.items()), name
        criterion = cls()  # the defaults are valid
        assert set(criterion.options()) <= set(spec), name
        assert make_criterion(name, **criterion.options()).options() == criterion.options()  # round trip
    spec = CRITERIA["attattr"].option_spec()
    assert spec["n_steps"].default == 20 and spec["integration"].default == "riemann_right"
    assert "gaussradau" in spec["integration"].choices


def _shards(batch, cuts):
    return [[{k: v[a:b] for k, v in batch.items()} for a, b in shard] for shard in cuts]


@pytest.mark.parametrize("name", ["attattr", "taylor", "fisher", "attention", "pairwise_share", "gradient_weighted"])
def test_accumulated_shards_merged_equal_one_pass_bit_for_bit(name, tmp_path):
    model = sharp_model()
    batch = padded_batch(batch=5, seed=4)
    batch["labels"] = torch.tensor([0, 1, 2, 1, 0])
    options = {"n_steps": 3, "integration": "gaussradau"} if name == "attattr" else {}
    shards = _shards(batch, [[(0, 1), (1, 2)], [(2, 4)], [(4, 5)]])
    partials = []
    for k, shard in enumerate(shards):
        accumulator = ScoreAccumulator(make_criterion(name, **options), model)
        assert sum(accumulator.update(b) for b in shard) == sum(b["input_ids"].shape[0] for b in shard)
        partial = accumulator.partial()
        partial.save(tmp_path / f"shard-{k}.pt", fingerprint="fp")  # through the file, as the pipeline does
        partials.append(ScorePartial.load(tmp_path / f"shard-{k}.pt"))
    merged = ScorePartial.merge(partials)
    assert merged.count == 5 and merged.fingerprint == "fp"
    criterion = make_criterion(name, **options)
    from_shards = finalize_scores(criterion, model, merged)
    # the same examples in one pass, batched as the shards were
    one_pass = head_importance(model, [b for shard in shards for b in shard], name, progress=False, **options)
    assert torch.equal(from_shards.values, one_pass.values)
    if name == "attattr":
        key = "relative_completeness_error"
        assert from_shards.provenance[key] == one_pass.provenance[key]
        assert merged.diagnostics["relative_completeness_error"].shape == (5, 3)  # [examples, layers]
    # merging sums in the given order: again, the same bits
    assert torch.equal(ScorePartial.merge(partials).sum, merged.sum)


def test_score_partial_files(tmp_path):
    partial = ScorePartial(torch.ones(2, 3, dtype=torch.float64), 4, {"d": torch.zeros(4, 2)}, 1.5)
    partial.save(tmp_path / "p.pt", fingerprint="abc")
    loaded = ScorePartial.load(tmp_path / "p.pt")
    assert torch.equal(loaded.sum, partial.sum) and loaded.count == 4 and loaded.fingerprint == "abc"
    assert torch.equal(loaded.diagnostics["d"], partial.diagnostics["d"]) and loaded.seconds == 1.5
    assert ScorePartial.load_matching(tmp_path / "p.pt", "abc") is not None
    assert ScorePartial.load_matching(tmp_path / "p.pt", "other") is None
    assert ScorePartial.load_matching(tmp_path / "missing.pt", "abc") is None
    (tmp_path / "torn.pt").write_bytes(b"PK\x03")
    assert ScorePartial.load_matching(tmp_path / "torn.pt", "abc") is None
    with pytest.raises(HeadpruneError, match="not a readable partial scores file"):
        ScorePartial.load(tmp_path / "torn.pt")
    with pytest.raises(HeadpruneError, match="no partial scores to merge"):
        ScorePartial.merge([])


def test_a_registered_criterion_is_used_like_the_built_in_ones():
    @register_criterion
    class LayerIndex(Criterion):
        """Every head scores its layer index times ``scale``, per example; summed over examples."""

        name = "test_layer_index"
        reduction = "sum"
        OPTIONS = (CriterionOption("scale", 1.0, float, "factor", minimum=0),)

        def per_example(self, model, batch):
            layers, heads = len(instrument.encoder_layers(model)), instrument.original_num_heads(model)
            values = torch.arange(layers, dtype=torch.float64)[:, None].expand(layers, heads)
            return self.settings["scale"] * values.expand(batch["input_ids"].shape[0], layers, heads)

        def take_diagnostics(self):
            return {"rows": torch.ones(2)}

        def summarize(self, diagnostics):
            return {"rows_seen": int(diagnostics["rows"].numel())}

    try:
        model = sharp_model()
        batch = padded_batch(batch=2, seed=1)
        scores = head_importance(model, [batch, batch], "test_layer_index", scale=2, progress=False)
        assert scores.values[:, 0].tolist() == [0.0, 8.0, 16.0]  # 2 * layer * 4 examples
        assert scores.provenance["rows_seen"] == 4 and scores.provenance["options"] == {"scale": 2.0}
        with pytest.raises(HeadpruneError, match="test_layer_index option scale: got -1; expected a number >= 0"):
            make_criterion("test_layer_index", scale=-1)
    finally:
        CRITERIA.pop("test_layer_index", None)


def test_head_scores_round_trip_rank_and_plot(tmp_path):
    values = torch.tensor([[0.1, 0.9, 0.3], [0.5, -0.2, 0.9]])
    scores = HeadScores(values, "attattr", {"model": "tiny", "examples": 3})
    assert scores.ranking()[:3] == [(0, 1), (1, 2), (1, 0)]  # tie 0.9/0.9 broken by position
    assert scores.ranks()[1, 1] == 5
    path = scores.save(tmp_path / "s.json")
    loaded = HeadScores.load(path)
    assert torch.equal(loaded.values, scores.values) and loaded.provenance == scores.provenance
    assert loaded.spearman(scores) == pytest.approx(1.0)
    reversed_scores = HeadScores(-values, "x")
    assert scores.spearman(reversed_scores) == pytest.approx(-1.0)
    scores.plot(tmp_path / "heads.png")
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(HeadpruneError, match="not found"):
        HeadScores.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(HeadpruneError, match="not valid JSON"):
        HeadScores.load(tmp_path / "bad.json")
    assert loaded.criterion == "attattr"
    data = json.loads(path.read_text())
    assert data["format"] == "headprune.HeadScores" and data["version"] == 2 and data["criterion"] == "attattr"


def test_head_scores_version_1_files_still_load(tmp_path):
    old = {
        "format": "headprune.HeadScores",
        "format_version": 1,
        "method": "attattr",
        "shape": [1, 2],
        "values": [[0.5, 0.25]],
        "provenance": {"options": {"n_steps": 3, "method": "gausslegendre", "target": "predicted"}},
    }
    (tmp_path / "v1.json").write_text(json.dumps(old))
    scores = HeadScores.load(tmp_path / "v1.json")
    assert scores.criterion == "attattr" and scores.values.tolist() == [[0.5, 0.25]]
    # attattr's quadrature option was called method: renamed, so the options construct the criterion again
    assert scores.provenance["options"] == {"n_steps": 3, "integration": "gausslegendre", "target": "predicted"}
    make_criterion(scores.criterion, **scores.provenance["options"])


V2 = '{"format": "headprune.HeadScores", "version": 2, "criterion": "x", '


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "not a headprune HeadScores file"),
        ('{"format": "headprune.Other", "version": 1}', "not a headprune HeadScores file (found a headprune.Other"),
        ('{"format": "headprune.HeadScores", "version": 9, "criterion": "x", "values": [[1]]}', "version 9 is newer"),
        ('{"format": "headprune.HeadScores", "version": 2, "values": [[1]]}', "criterion: expected the criterion"),
        (V2 + '"values": 3}', "values: expected an [layers"),
        (V2 + '"values": []}', "values: expected an [layers"),
        (V2 + '"values": [[1, 2], [3]]}', "ragged"),
        (V2 + '"values": [[1, "a"]]}', "values[0][1]"),
        (V2 + '"values": [[1]], "shape": [2, 1]}', "shape says [2, 1]"),
    ],
)
def test_corrupt_head_scores_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "scores.json"
    path.write_text(text)
    with pytest.raises(HeadpruneError) as caught:
        HeadScores.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_plot_draws_into_a_given_axes_without_pyplot(tmp_path, monkeypatch):
    import sys

    import matplotlib
    from matplotlib.figure import Figure

    def no_backend_switch(*args, **kwargs):
        raise AssertionError("HeadScores.plot must not call matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", no_backend_switch)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now fails
    figure = Figure()
    ax = figure.add_subplot()
    scores = HeadScores(torch.rand(2, 3, generator=torch.Generator().manual_seed(0)), "taylor")
    assert scores.plot(ax=ax, title="mine") is ax and ax.get_title() == "mine"
    assert scores.plot(tmp_path / "own.png").figure is not figure
    assert (tmp_path / "own.png").read_bytes()[:4] == b"\x89PNG"


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    from attribution.core.io import atomic_output, atomic_write_text

    path = tmp_path / "sub" / "scores.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["scores.json"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not a private 0600
    with atomic_output(tmp_path / "figure.png") as tmp:
        assert tmp.suffix == ".png"  # writers that pick the format by suffix still work
        tmp.write_bytes(b"png")
    assert (tmp_path / "figure.png").read_bytes() == b"png"


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    from attribution.core.io import atomic_directory, current_umask

    final = tmp_path / "out" / "model"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".model.") and tmp.name.endswith(".tmp")
        (tmp / "a.txt").write_text("first")
        (tmp / "a.txt").chmod(0o600)  # as safetensors' writer leaves its files
    assert (final / "a.txt").read_text() == "first"
    mask = current_umask()
    assert final.stat().st_mode & 0o777 == 0o777 & ~mask and (final / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError, match="killed"), atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "first"  # a failed write leaves the old directory
    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]  # no temporary or old copy left
