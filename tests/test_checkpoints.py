"""prune.checkpoints: the one loader (pruned and dense directories, hub ids, shorthands) and
save_pruned; every analysis command takes a pruned directory as --model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.checkpoints import KEPT_HEADS_KEY, load_model, read_kept_heads, resolve_model, save_pruned
from prune.cli import main
from prune.surgery import remove_heads
from tests.conftest import padded_batch, tiny_model
from tests.prune_helpers import sensitive, tiny_dataset, tiny_tokenizer

# layer 1 loses every head: the analyses must cope with a layer that has none
REMOVED = {0: [0, 2], 1: [0, 1, 2, 3], 2: [3]}
KEPT = [[1, 3], [], [0, 1, 2]]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny 3-class BERT with heads removed (one layer empty), saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = sensitive(tiny_model("bert", layers=3, heads=4, labels=3))
    model.config.id2label = {0: "0", 1: "1", 2: "2"}
    model.config.label2id = {"0": 0, "1": 1, "2": 2}
    remove_heads(model, REMOVED)
    path = save_pruned(model, folder / "pruned", tiny_tokenizer(folder / "tok"))
    return path, model


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tiny_dataset(60, seed=4)
    path = tmp_path_factory.mktemp("data") / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(data["text"], data["label"], strict=True))
    return path


# --------------------------------------------------------------------------------------------
# load_model


def test_pruned_directory_loads_to_the_saved_model(pruned):
    path, model = pruned
    assert read_kept_heads(path) == KEPT
    loaded, tokenizer = load_model(path)
    assert not loaded.training and tokenizer is not None
    assert instrument.kept_heads(loaded) == KEPT and getattr(loaded.config, KEPT_HEADS_KEY) == KEPT
    batch = padded_batch(batch=4, length=9, seed=5)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert load_model(str(path), tokenizer=False)[1] is None


def test_dense_directory_loads_through_from_pretrained(tmp_path):
    model = sensitive(tiny_model("roberta", labels=2))
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer(tmp_path / "dense").save_pretrained(tmp_path / "dense")
    assert read_kept_heads(tmp_path / "dense") is None
    loaded, tokenizer = load_model(tmp_path / "dense")
    assert not loaded.training and tokenizer is not None
    batch = padded_batch(pad_id=1)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_kept_heads_that_do_not_fit_the_weights_are_one_line_errors(pruned, tmp_path):
    path, _ = pruned
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((path / name).read_bytes())
    config = json.loads((path / "config.json").read_text())
    for kept, message in [
        ([[0, 1, 3], [], [0, 1, 2]], "do not fit the recorded heads"),  # one head too many in layer 0
        ([[1, 3], [0], [0, 1, 2]], "do not match the architecture|do not fit the recorded heads"),
        ([[1, 3], [0, 1, 2]], "must list, for each of the 3 layers"),
        ([[1, 3], [], [0, 1, 7]], "head indices in 0..3"),
    ]:
        (broken / "config.json").write_text(json.dumps({**config, KEPT_HEADS_KEY: kept}))
        with pytest.raises(HeadpruneError, match=message) as error:
            load_model(broken)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "a/b/c"])
def test_missing_model_path_is_one_line_error(name):
    with pytest.raises(HeadpruneError, match="model directory not found") as error:
        load_model(name)
    assert "\n" not in str(error.value)


def test_unknown_hub_id_is_one_line_error():
    with pytest.raises(HeadpruneError, match="cannot load model 'nobody-xyz/no-model-here'") as error:
        load_model("nobody-xyz/no-model-here", local_files_only=True)
    assert "\n" not in str(error.value)


def test_directory_without_config_or_tokenizer_is_rejected(pruned, tmp_path):
    with pytest.raises(HeadpruneError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(HeadpruneError, match="empty model name"):
        resolve_model(" ")
    path, model = pruned
    bare = save_pruned(model, tmp_path / "bare")  # no tokenizer saved with it
    with pytest.raises(HeadpruneError, match="no tokenizer saved with the model"):
        load_model(bare)
    assert instrument.kept_heads(load_model(bare, tokenizer=False)[0]) == KEPT


def test_the_loader_replaces_the_old_ones():
    import ast
    import importlib

    import prune
    import prune.evaluate
    import prune.surgery

    assert prune.load_model is load_model and prune.save_pruned is save_pruned
    assert not hasattr(prune.evaluate, "load_model") and not hasattr(prune.surgery, "load_pruned")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("attribution.models")
    # no cycle: checkpoints uses finetune (for "default"), never the other way round
    tree = ast.parse((Path(prune.__file__).parent / "finetune.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(name.startswith(("prune.checkpoints", "prune.surgery")) for name in imported)


# --------------------------------------------------------------------------------------------
# every analysis command takes a pruned directory


def test_explain_on_a_pruned_model(pruned, tmp_path, capsys):
    path, _ = pruned
    out = tmp_path / "explain.html"
    assert main(["explain", "--model", str(path), "--text", "w1 w2 w3 w4", "--out", str(out),
                 "--json", str(tmp_path / "explain.json")]) == 0
    assert out.is_file() and out.with_suffix(".png").is_file() and (tmp_path / "explain.json").is_file()
    assert "wrote" in capsys.readouterr().out


def test_tree_on_a_pruned_model(pruned, tmp_path):
    path, _ = pruned
    out = tmp_path / "tree.json"
    assert main(["tree", "--model", str(path), "--text", "w1 w2 w3 w4", "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())


def test_triggers_on_a_pruned_model(pruned, data_csv, tmp_path):
    path, _ = pruned
    out = tmp_path / "triggers.json"
    assert main(["triggers", "--model", str(path), "--data", str(data_csv), "--examples", "24",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())


def test_faithfulness_on_a_pruned_model(pruned, data_csv, tmp_path):
    path, _ = pruned
    out = tmp_path / "faithfulness"
    assert main(["faithfulness", "--model", str(path), "--data", str(data_csv), "--examples", "6",
                 "--out", str(out), "--quiet"]) == 0
    assert all((out / f"faithfulness.{suffix}").is_file() for suffix in ("json", "md", "png"))
