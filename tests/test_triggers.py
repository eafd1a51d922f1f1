"""Trigger patterns: a tiny model trained here on "alpha ... beta" -> class 1 yields that pair as the top
class-1 pattern, and inserting it flips predictions far more than random tokens do. Plus insertion
arithmetic, sentence pairs, JSON round trips and the CLI."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from attribution.core.errors import HeadpruneError
from attribution.triggers import (
    TriggerPattern,
    TriggerReport,
    attack_triggers,
    insert_into_segment,
    insert_pattern,
    insertion_slots,
    mine_triggers,
    random_pool,
)

WORDS = [f"w{i}" for i in range(30)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alpha", "beta", "[unused0]", "##x"] + WORDS


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def synthetic(n: int, seed: int) -> datasets.Dataset:
    """Class 1 iff "alpha" comes before "beta"; class 0 has one of them alone, or neither — so the
    label is decided by the pair, not by either token."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for k in range(n):
        length = int(rng.integers(5, 10))
        words = list(rng.choice(WORDS, size=length))
        i, j = sorted(rng.choice(length, size=2, replace=False))
        kind = k % 4
        if kind == 0:
            words[i], words[j] = "alpha", "beta"
        elif kind == 1:
            words[i] = "alpha"
        elif kind == 2:
            words[j] = "beta"
        texts.append(" ".join(words))
        labels.append(int(kind == 0))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A 2-layer BERT trained for a few seconds on the synthetic task (held-out accuracy checked)."""
    train, held = synthetic(1600, 0), synthetic(400, 1)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=2, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1},
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encoding = tokenizer(list(train["text"]), padding=True, return_tensors="pt")
    labels = torch.tensor(train["label"])
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 32):
            rows = order[start : start + 32]
            loss = model(input_ids=encoding["input_ids"][rows], attention_mask=encoding["attention_mask"][rows],
                         labels=labels[rows]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        held_encoding = tokenizer(list(held["text"]), padding=True, return_tensors="pt")
        accuracy = (model(**held_encoding).logits.argmax(-1) == torch.tensor(held["label"])).float().mean()
    assert accuracy > 0.95, f"the synthetic task was not learned ({accuracy:.2f})"
    return model, train, held


@pytest.fixture(scope="module")
def report(trained, tokenizer):
    model, train, _ = trained
    return mine_triggers(model, tokenizer, train, examples=120, n_steps=4, integration="gausslegendre", progress=False)


def test_mining_recovers_the_deciding_pair(report):
    top = report.top(1, 1)[0]
    assert top.tokens == ["alpha", "beta"]
    assert top.label == 1 and top.segments == [0, 0]
    assert top.positions[0] < top.positions[1]  # alpha comes first, as in every source
    # it dominates class 1: most class-1 examples produce it, and it outranks the rest by far
    correct_yes = report.stats["per_class"]["yes"]["correct"]
    assert top.count >= 0.6 * correct_yes
    rest = report.patterns[1][1:]
    assert all(top.score > 3 * p.score for p in rest)
    assert sum(p.count for pats in report.patterns for p in pats) <= report.stats["with_pattern"]
    assert report.stats["examples"] == 120
    for pats in report.patterns:  # ranked by summed score
        assert [p.score for p in pats] == sorted((p.score for p in pats), reverse=True)


def test_attack_flips_far_more_than_random_tokens(trained, tokenizer, report):
    model, _, held = trained
    attacked = attack_triggers(model, tokenizer, report, held, top_k=3, random_trials=2, progress=False)
    pair = next(a for a in attacked.attacks if a.label == 1 and a.rank == 1)
    assert pair.tokens == ["alpha", "beta"]
    assert pair.examples == sum(1 for v in held["label"] if v != 1)
    assert pair.accuracy_before > 0.95
    assert pair.drop > 0.8 and pair.flip_rate > 0.8
    assert pair.random_drop < 0.2
    assert pair.drop > pair.random_drop + 0.6
    summary = next(c for c in attacked.class_attacks if c.label == 1)
    assert summary.best_drop == pytest.approx(pair.drop)
    assert summary.mean_drop > summary.mean_random_drop + 0.5
    assert report.attacks == []  # the input report is not modified


def test_report_round_trip(tmp_path, trained, tokenizer, report):
    model, _, held = trained
    attacked = attack_triggers(model, tokenizer, report, held, top_k=1, random_trials=1, examples=60, progress=False)
    path = tmp_path / "triggers.json"
    attacked.save(path)
    loaded = TriggerReport.load(path)
    assert loaded == attacked
    data = json.loads(path.read_text())
    assert data["format"] == "headprune.trigger_report" and data["version"] == 2
    assert data["label_names"] == ["no", "yes"] and len(data["patterns"]) == 2  # one list per class index
    assert data["patterns"][1][0]["tokens"] == ["alpha", "beta"]
    assert "alpha beta" in loaded.summary()
    # a version-1 file (patterns keyed by class name, derived numbers written out) still loads
    old = {
        **data,
        "version": 1,
        "patterns": {
            name: [p | {"mean_score": 0.0} for p in pats]
            for name, pats in zip(data["label_names"], data["patterns"], strict=True)
        },
        "attacks": [a | {"drop": 0.0, "random_drop": 0.0} for a in data["attacks"]],
    }
    (tmp_path / "v1.json").write_text(json.dumps(old))
    assert TriggerReport.load(tmp_path / "v1.json") == attacked
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(HeadpruneError, match="expected a headprune.trigger_report file"):
        TriggerReport.load(bad)
    bad.write_text(json.dumps({**data, "attacks": [{"label": 0}]}))
    with pytest.raises(HeadpruneError, match=r"bad\.json\.attacks\[0\]: missing key 'rank'"):
        TriggerReport.load(bad)


@pytest.mark.parametrize(
    ("length", "positions", "slots"),
    [
        (4, [0.0], [0]),
        (4, [1.0], [4]),
        (4, [0.5], [2]),  # round(0.5 * 4)
        (4, [0.5, 0.5], [3, 4]),  # round(0.5 * 5) = 3 (half up), then nudged to 4
        (4, [1.0, 1.0], [4, 5]),  # both at the end, in order
        (4, [0.9, 0.1], [5, 1]),  # returned in the order given
        (0, [0.3, 0.7], [0, 1]),
    ],
)
def test_insertion_slots(length, positions, slots):
    assert insertion_slots(length, positions) == slots


def test_insert_into_segment_and_pairs():
    assert insert_into_segment([10, 11, 12, 13], [1, 2], [0.0, 1.0]) == [1, 10, 11, 12, 13, 2]
    assert insert_into_segment([10, 11, 12, 13], [1], [0.5]) == [10, 11, 1, 12, 13]
    # a pair example: [CLS] 10 11 12 [SEP] 20 21 [SEP]; tokens go to their own segment with its type id
    example = ([2, 10, 11, 12, 3, 20, 21, 3], [0, 0, 0, 0, 0, 1, 1, 1], [None, 0, 0, 0, None, 1, 1, None])
    pattern = TriggerPattern(label=0, tokens=["a", "b"], token_ids=[7, 8], segments=[0, 1], positions=[0.0, 1.0],
                             count=1, score=1.0, max_score=1.0)
    ids, types = insert_pattern(example, pattern.token_ids, pattern)
    assert ids == [2, 7, 10, 11, 12, 3, 20, 21, 8, 3]
    assert types == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    # a pattern from the second text of a pair, applied to a single text: goes to the first
    single = ([2, 10, 11, 3], [0, 0, 0, 0], [None, 0, 0, None])
    assert insert_pattern(single, [9], TriggerPattern(0, ["x"], [9], [1], [1.0], 1, 1.0, 1.0))[0] == [2, 10, 11, 9, 3]


def test_random_pool_excludes_special_and_pieces(tokenizer):
    pool = set(random_pool(tokenizer))
    names = set(tokenizer.convert_ids_to_tokens(sorted(pool)))
    assert names == {"alpha", "beta", *WORDS}


def test_sentence_pair_mining(tokenizer):
    """Pair data: patterns record the segment of each token; insertion puts them back there."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=20, num_labels=2, max_position_embeddings=32)
    model = BertForSequenceClassification(config).eval()
    data = datasets.Dataset.from_dict({"text": ["w1 w2 w3", "w4 alpha", "w5 w6"], "text_pair": ["w7", "beta w8", "w9"],
                                       "label": [0, 1, 0]})
    with torch.no_grad():
        encoding = tokenizer(list(data["text"]), list(data["text_pair"]), padding=True, return_tensors="pt")
        predicted = model(**encoding).logits.argmax(-1).tolist()
    report = mine_triggers(
        model, tokenizer, data, examples=None, n_steps=2, integration="gausslegendre", progress=False
    )
    correct = sum(p == y for p, y in zip(predicted, data["label"], strict=True))
    assert report.stats["correct"] == correct
    for pats in report.patterns:
        for p in pats:
            assert all(s in (0, 1) for s in p.segments) and all(0.0 <= r <= 1.0 for r in p.positions)
            assert not set(p.tokens) & {"[CLS]", "[SEP]", "[PAD]"}
    attacked = attack_triggers(model, tokenizer, report, data, top_k=2, random_trials=1, progress=False)
    assert all(0.0 <= a.accuracy_after <= 1.0 for a in attacked.attacks)


def test_bad_inputs(trained, tokenizer):
    model, train, _ = trained
    with pytest.raises(HeadpruneError, match="'text' column"):
        mine_triggers(model, tokenizer, datasets.Dataset.from_dict({"x": ["a"], "label": [0]}), progress=False)
    with pytest.raises(HeadpruneError, match="pairs"):
        mine_triggers(model, tokenizer, train, pairs=0, progress=False)
    with pytest.raises(HeadpruneError, match="examples"):
        mine_triggers(model, tokenizer, train, examples=0, progress=False)


def test_cli_triggers(tmp_path, monkeypatch, capsys, trained, tokenizer):
    from prune import cli

    model, train, held = trained
    splits = datasets.DatasetDict({"train": train, "validation": held, "test": held})
    monkeypatch.setattr("prune.checkpoints.load_model", lambda name, **kw: (model, tokenizer))
    monkeypatch.setattr("attribution.core.data.load_splits", lambda spec: splits)
    out = tmp_path / "triggers.json"
    code = cli.main(["triggers", "--model", "x", "--data", "synthetic", "--examples", "60", "--n-steps", "3",
                     "--integration", "gausslegendre", "--out", str(out), "--attack", "--top-k", "1",
                     "--attack-examples", "80", "--random-trials", "1", "--quiet"])
    assert code == 0
    report = TriggerReport.load(out)
    assert report.top(1, 1)[0].tokens == ["alpha", "beta"]
    assert report.provenance["attack"]["split"] == "validation" and report.provenance["n_steps"] == 3
    assert report.provenance["integration"] == "gausslegendre" and report.provenance["data"] == "synthetic"
    assert len(report.attacks) == 2
    # attack again from the saved patterns, without mining
    again = tmp_path / "again.json"
    assert cli.main(["triggers", "--model", "x", "--patterns", str(out), "--attack", "--top-k", "1",
                     "--attack-examples", "80", "--random-trials", "1", "--out", str(again), "--quiet"]) == 0
    assert TriggerReport.load(again).attacks == report.attacks
    assert cli.main(["triggers", "--model", "x", "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out must be a .json" in capsys.readouterr().err
