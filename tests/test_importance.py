"""Head-importance criteria, HeadScores persistence and ranking."""

from __future__ import annotations

import os

import pytest
import torch

from attribution import CRITERIA, HeadScores, head_importance, instrument
from attribution.core.errors import HeadpruneError
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
@pytest.mark.parametrize("method", ["attattr", "taylor", "fisher"])
def test_designed_decision_head_ranks_first(method, seed):
    model = decisive_model(seed)
    batch = padded_batch(batch=6, seed=seed)
    batch["labels"] = model(**batch).logits.argmax(-1)
    options = {"n_steps": 8} if method == "attattr" else {}
    scores = head_importance(model, [batch], method, progress=False, **options)
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


def test_bad_methods_and_options():
    model = sharp_model()
    with pytest.raises(HeadpruneError, match="unknown head-importance method 'magic'"):
        head_importance(model, [], "magic")
    with pytest.raises(HeadpruneError, match="bad option for 'taylor'"):
        head_importance(model, [], "taylor", steps=3)
    with pytest.raises(HeadpruneError, match="no examples"):
        head_importance(model, [], "taylor", progress=False)
    assert {"attattr", "taylor", "fisher", "attention", "random"} <= set(CRITERIA)


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
