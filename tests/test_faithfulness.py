"""Faithfulness benchmark (hand-computed on a counting model), batching of perturbed inputs, result
persistence; the explanation page; the ``explain`` and ``faithfulness`` commands end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attribution.core.errors import HeadpruneError
from attribution.explain_html import Explanation, explain_text, merge_word_pieces
from attribution.faithfulness import (
    BatchedPredictor,
    FaithfulnessResult,
    delete_tokens,
    deletion_order,
    faithfulness,
    n_deleted,
)
from attribution.relevance import RELEVANCE_METHODS
from tests.conftest import padded_batch, sharp_model, tiny_model
from tests.test_relevance import decisive_batch, trained  # noqa: F401  (the trained toy fixture)

CLS, SEP, SIGNAL, NOISE = 2, 3, 7, 9


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_deletion_helpers():
    assert [n_deleted(f, 7) for f in (0.0, 0.1, 0.5, 0.9, 1.0)] == [0, 1, 4, 6, 7]  # floor(f m + 0.5)
    relevance = [9.0, 0.5, 2.0, 0.5, -1.0, 9.0]
    deletable = [False, True, True, True, True, False]  # [CLS] ... [SEP]
    assert deletion_order(relevance, deletable, True) == [2, 1, 3, 4]  # ties: lower position first
    assert deletion_order(relevance, deletable, False) == [4, 1, 3, 2]
    assert delete_tokens([2, 5, 6, 3, 8, 3], [0, 0, 0, 0, 1, 1], [1, 4]) == ((2, 6, 3, 3), (0, 0, 0, 1))
    assert delete_tokens([2, 5, 3], None, []) == ((2, 5, 3), None)


class CountingModel(nn.Module):
    """logits = [1, 2 * (number of SIGNAL tokens)]: p(class 1) = sigmoid(2 n - 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=0, _name_or_path="counting", model_type="counting")
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.calls += 1
        count = ((input_ids == SIGNAL) & (attention_mask == 1)).sum(-1).float()
        logits = torch.stack([torch.ones_like(count), 2 * count], dim=-1) + 0 * self.dummy
        return SimpleNamespace(logits=logits)


class TokenScore:
    """A duck-typed relevance method: a fixed score per token id."""

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = scores

    def options(self) -> dict:
        return {"scores": {str(k): v for k, v in self.scores.items()}}

    def attribute(self, inputs, target=None):
        ids = inputs["input_ids"]
        out = torch.zeros(ids.shape)
        for token, score in self.scores.items():
            out[ids == token] = score
        return out * inputs["attention_mask"]


def test_scores_hand_computed_on_a_counting_model():
    model = CountingModel()
    batch = {
        "input_ids": torch.tensor([[CLS, SIGNAL, NOISE, NOISE, SIGNAL, SEP]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "labels": torch.tensor([1]),
    }
    methods = {"oracle": TokenScore({SIGNAL: 1.0}), "anti": TokenScore({NOISE: 1.0})}
    result = faithfulness(
        model, [batch], methods, keep_ids=[CLS, SEP], fractions=[0.0, 0.5, 1.0], bins=[0.25, 0.5], progress=False
    )
    oracle, anti = result.methods["oracle"], result.methods["anti"]
    # full input: n = 2 -> class 1, p = sigmoid(3). Oracle deletes both SIGNALs at 50%, anti keeps them.
    assert oracle.positive == [1.0, 0.0, 0.0] and oracle.negative == [1.0, 1.0, 0.0]
    assert anti.positive == [1.0, 1.0, 0.0] and anti.negative == [1.0, 0.0, 0.0]
    assert oracle.positive_auc == pytest.approx(0.25) and oracle.negative_auc == pytest.approx(0.75)
    p3, p1, pm1 = sigmoid(3), sigmoid(1), sigmoid(-1)
    assert oracle.positive_probability == pytest.approx([p3, pm1, pm1])
    assert oracle.comprehensiveness == pytest.approx(((p3 - p1) + (p3 - pm1)) / 2)  # 1 and 2 SIGNALs removed
    assert oracle.sufficiency == pytest.approx(((p3 - p1) + 0.0) / 2)  # only 1, then 2 SIGNALs kept
    assert oracle.aopc == pytest.approx((0 + 2 * (p3 - pm1)) / 3)
    assert anti.comprehensiveness == pytest.approx(0.0)  # removing NOISE changes nothing
    assert anti.sufficiency == pytest.approx((p3 - pm1) * 2 / 2)  # only NOISE kept: no SIGNAL left
    assert result.accuracy == 1.0 and result.reference == "gold" and result.examples == 1


def test_perturbed_inputs_go_through_few_forward_calls():
    model = CountingModel()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 12, (20, 12), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    batches = [{"input_ids": ids[i : i + 10], "attention_mask": torch.ones(10, 12, dtype=torch.long)} for i in (0, 10)]
    methods = {"a": TokenScore({SIGNAL: 1.0}), "b": TokenScore({NOISE: 1.0, 8: 0.5})}
    result = faithfulness(model, batches, methods, keep_ids=[CLS, SEP], forward_batch_size=4096, progress=False)
    # per batch: one call for the full inputs, one for all 2 methods x (2 x 10 fractions + 2 x 5 bins) variants
    assert model.calls == 4 and result.provenance["forward_calls"] == 4
    assert result.reference == "prediction" and result.accuracy == 1.0


def test_batched_predictor_equals_one_call_per_sequence():
    model = sharp_model()
    sequences = [((2, 5, 9, 3), (0, 0, 0, 0)), ((2, 7, 3), (0, 0, 0)), ((2, 5, 9, 3), (0, 0, 0, 0)), ((2, 3), (0, 1))]
    predictor = BatchedPredictor(model, pad_id=0, forward_batch_size=2)
    probs = predictor(sequences)
    assert predictor.calls == 2  # 3 unique sequences, 2 per call
    for row, (ids, types) in zip(probs, sequences, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
        assert torch.allclose(row, torch.softmax(logits, -1)[0], atol=1e-5)


def _no_global_matplotlib_state(*args, **kwargs):
    raise AssertionError("library code must not call matplotlib.use (it changes the backend for everyone)")


def test_result_round_trip_table_and_plot(tmp_path: Path, monkeypatch):
    model = sharp_model()
    batch = {**padded_batch(seed=3), "labels": torch.tensor([0, 1, 2])}
    names = list(RELEVANCE_METHODS)
    result = faithfulness(
        model, [batch], names, keep_ids=[2], method_options={"ig": {"n_steps": 4}, "attattr": {"n_steps": 2}},
        progress=False,
    )
    assert list(result.methods) == names
    for m in result.methods.values():
        assert len(m.positive) == 10 and 0 <= m.positive_auc <= 1 and m.seconds_per_example > 0
        assert m.positive[0] == m.negative[0] == result.accuracy  # nothing deleted yet
    assert result.methods["attattr"].options["integration"] == "gausslegendre"
    assert result.methods["ig"].options == {"n_steps": 4, "integration": "gausslegendre", "output": "probability"}
    path = result.save(tmp_path / "f.json")
    again = FaithfulnessResult.load(path)
    assert again == result
    data = json.loads(path.read_text())
    assert data["format"] == "headprune.FaithfulnessResult" and data["version"] == 1
    old = tmp_path / "old.json"  # written before Record: "format_version" instead of "version"
    old.write_text(json.dumps({k: v for k, v in data.items() if k != "version"} | {"format_version": 1}))
    assert FaithfulnessResult.load(old) == result
    table = again.table()
    assert table.count("\n") == len(names) + 1 and all(f"| {n} |" in table for n in names)
    monkeypatch.setattr("matplotlib.use", _no_global_matplotlib_state)
    again.plot(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.png").stat().st_size > 1000
    with pytest.raises(HeadpruneError, match="expected a headprune.FaithfulnessResult file, found a other file"):
        FaithfulnessResult.from_dict({"format": "other"})
    del data["methods"]["attattr"]["aopc"]
    path.write_text(json.dumps(data))
    with pytest.raises(HeadpruneError, match=r"f\.json\.methods\.attattr: missing key 'aopc'"):
        FaithfulnessResult.load(path)


def test_bad_arguments():
    model = CountingModel()
    with pytest.raises(HeadpruneError, match="fractions"):
        faithfulness(model, [], {"a": TokenScore({})}, fractions=[0.5, 0.1], progress=False)
    with pytest.raises(HeadpruneError, match="no examples"):
        faithfulness(model, [], {"a": TokenScore({})}, progress=False)


def test_deciding_token_toy_gradient_methods_beat_random(trained):  # noqa: F811
    inputs, labels, _ = decisive_batch(40, seed=11)
    batches = [{**{k: v[i : i + 20] for k, v in inputs.items()}, "labels": labels[i : i + 20]} for i in (0, 20)]
    result = faithfulness(
        trained, batches, ["gae", "ig", "random"], keep_ids=[2, 3], method_options={"ig": {"n_steps": 8}},
        progress=False,
    )
    random = result.methods["random"]
    for name in ("gae", "ig"):
        m = result.methods[name]
        assert m.positive_auc < random.positive_auc - 0.2, (name, m.positive_auc, random.positive_auc)
        assert m.negative_auc >= random.negative_auc
        assert m.comprehensiveness > random.comprehensiveness and m.sufficiency < random.sufficiency


# ---- the explanation page ---------------------------------------------------------------------

WORDS = ["the", "movie", "is", "good", "bad", "not", "a", "plot", "##s", "actor"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_word_pieces_are_merged_into_the_original_words(tokenizer):
    text, pair = "The Plots <b>", "bad"
    encoding = tokenizer(text, pair, return_offsets_mapping=True, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    assert tokens == ["[CLS]", "the", "plot", "##s", "[UNK]", "[UNK]", "[UNK]", "[SEP]", "bad", "[SEP]"]
    values = {"m": [100.0, 1.0, 2.0, 3.0, 0.5, 0.25, 0.125, 100.0, 4.0, 100.0]}
    words, segments, merged = merge_word_pieces(tokenizer, encoding, values, [text, pair])
    assert words == ["The", "Plots", "<", "b", ">", "bad"]
    assert segments == [0, 0, 0, 0, 0, 1]
    assert merged["m"] == [1.0, 5.0, 0.5, 0.25, 0.125, 4.0]  # pieces summed, specials dropped


def test_explanation_page_png_and_json(tokenizer, tmp_path: Path, monkeypatch):
    model = tiny_model("bert", labels=2)
    model.config.id2label = {0: "negative", 1: "positive"}
    explanation = explain_text(
        model, tokenizer, "the movies <script>", "a plot", "gae,attention,ig", target="positive",
        method_options={"ig": {"n_steps": 4}},
    )
    assert explanation.target == 1 and explanation.target_name == "positive"
    assert explanation.words == ["the", "movies", "<", "script", ">", "a", "plot"]
    assert set(explanation.relevance) == {"gae", "attention", "ig"}
    page = explanation.to_html()
    assert "<script>" not in page and "&lt;" in page  # the text is escaped
    assert "http" not in page and "<link" not in page and "src=" not in page  # self-contained
    assert page.count("<tr>") == 3 and page.count('class="w"') == 3 * 7
    explanation.save_html(tmp_path / "e.html")
    monkeypatch.setattr("matplotlib.use", _no_global_matplotlib_state)
    explanation.save_png(tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert Explanation.load(explanation.save(tmp_path / "e.json")) == explanation
    assert explanation.provenance["methods"]["ig"]["integration"] == "gausslegendre"
    scaled = explanation.normalized()
    assert all(max(abs(v) for v in values) == pytest.approx(1.0) for values in scaled.values())
    with pytest.raises(HeadpruneError, match="unknown class 'neutral'; the model's classes: negative, positive"):
        explain_text(model, tokenizer, "good", methods="gae", target="neutral")
    assert explain_text(model, tokenizer, "good", methods="gae", target="1").target_name == "positive"
    with pytest.raises(HeadpruneError, match=r"class index 2 outside 0\.\.1"):
        explain_text(model, tokenizer, "good", methods="gae", target=2)
    with pytest.raises(HeadpruneError, match="empty"):
        explain_text(model, tokenizer, "  ", methods="gae")


# ---- the commands ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model("bert", labels=2)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_explain_command(saved_model: Path, tmp_path: Path, capsys):
    from prune.cli import main

    out = tmp_path / "page.html"
    code = main(["explain", "--model", str(saved_model), "--text", "the good movie", "--methods", "rollout,gae",
                 "--out", str(out), "--json", str(tmp_path / "e.json")])
    assert code == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and out.with_suffix(".png").exists()
    assert set(json.loads((tmp_path / "e.json").read_text())["relevance"]) == {"rollout", "gae"}
    assert "class explained" in capsys.readouterr().out
    assert main(["explain", "--model", str(saved_model), "--text", "x", "--methods", "lime"]) == 2
    assert "unknown relevance method 'lime'" in capsys.readouterr().err


def test_faithfulness_command(saved_model: Path, tmp_path: Path, capsys):
    from prune.cli import main

    data = tmp_path / "reviews.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([" ".join(WORDS[(i + j) % 8] for j in range(3 + i % 5)), ["negative", "positive"][i % 2]])
    out = tmp_path / "bench"
    code = main(["faithfulness", "--model", str(saved_model), "--data", str(data), "--examples", "3",
                 "--methods", "attention,random", "--out", str(out), "--quiet", "--fractions", "0,0.5"])
    assert code == 0
    result = FaithfulnessResult.load(out / "faithfulness.json")
    assert result.examples == 3 and result.fractions == [0.0, 0.5] and list(result.methods) == ["attention", "random"]
    assert "| attention |" in (out / "faithfulness.md").read_text() and (out / "faithfulness.png").exists()
    assert "pos. AUC" in capsys.readouterr().out
    assert main(["faithfulness", "--model", str(saved_model), "--data", str(data), "--examples", "0",
                 "--out", str(out)]) == 2
    assert "--examples must be at least 1" in capsys.readouterr().err
