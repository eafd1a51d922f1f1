"""Pruned models outside headprune: transformers' pipeline on a loaded pruned model, the opt-in
self-contained modeling file (loaded with ``trust_remote_code`` in a process that cannot import
headprune), and the ONNX export directory used by plain onnxruntime (the README's snippet, run
literally)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast

from attribution import instrument
from prune import modeling_headprune
from prune.checkpoints import load_model, save_pruned
from prune.remote_code import AUTO_MAP_KEY, MODELING_FILE, auto_map, is_headprune_remote_code
from prune.surgery import remove_heads, remove_neurons
from tests.conftest import FAMILIES, tiny_model
from tests.prune_helpers import SPECIAL, WORDS, sensitive, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w12 w13"]


def pruned_dir(tmp_path: Path, family: str = "bert", *, remote_code: bool = False, name: str = "pruned") -> Path:
    """A tiny pruned checkpoint with uneven heads, one layer without heads, uneven neurons and one
    layer without neurons (3 layers, 4 heads, 37 neurons), saved with its tokenizer."""
    model = sensitive(tiny_model(family, layers=3, heads=4), seed=1)
    tokenizer = tiny_tokenizer(tmp_path / "tok") if family != "distilbert" else tokenizer_without_token_types()
    remove_heads(model, {0: [1, 3], 1: [0, 1, 2, 3], 2: [2]})
    remove_neurons(model, {0: list(range(0, 37, 3)), 1: list(range(20)), 2: list(range(37))})
    assert instrument.heads_per_layer(model) == [2, 0, 3]
    assert instrument.neurons_per_layer(model) == [24, 17, 0]
    return save_pruned(model, tmp_path / name, tokenizer, remote_code=remote_code)


def tokenizer_without_token_types() -> BertTokenizerFast:
    """The tiny models' tokenizer making only input_ids and attention_mask (as DistilBERT's and
    RoBERTa's own tokenizers do)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=False, model_input_names=["input_ids", "attention_mask"])


def softmax_of(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}).logits.softmax(-1)


# --------------------------------------------------------------------------------------------
# transformers.pipeline on a loaded pruned model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_pipeline_serves_a_loaded_pruned_model(tmp_path, family):
    from transformers import pipeline

    model, tokenizer = load_model(pruned_dir(tmp_path, family))
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    got = classify(TEXTS)
    expected = softmax_of(model, tokenizer, TEXTS)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for row, probabilities in zip(got, expected, strict=True):
        scores = {entry["label"]: entry["score"] for entry in row}
        assert sorted(scores) == sorted(labels)
        assert torch.allclose(torch.tensor([scores[label] for label in labels]), probabilities, atol=1e-6)
    # the scores are not uniform: the pruned layers really compute something
    assert float(expected.max() - expected.min()) > 0.05


def test_pipeline_by_directory_fails_on_the_shapes_without_remote_code(tmp_path):
    from transformers import pipeline

    directory = pruned_dir(tmp_path)
    with pytest.raises(Exception, match="(?i)size|shape"):
        pipeline("text-classification", model=str(directory))


# --------------------------------------------------------------------------------------------
# The opt-in modeling file
# --------------------------------------------------------------------------------------------

# Runs in a subprocess with an isolated interpreter (-I: no PYTHONPATH, no user site, no current
# directory on sys.path) and a meta-path hook refusing `prune` and `attribution`, whatever else is
# installed: the checkpoint must load with transformers and torch alone.
_REMOTE_LOADER = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prune", "attribution", "tests"):
            raise ImportError(f"headprune is not available here ({name})")
        return None

sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

texts, results = json.loads(sys.argv[1]), {}
torch.manual_seed(0)
for directory in sys.argv[2:]:
    model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**batch).logits
    served = pipeline("text-classification", model=directory, trust_remote_code=True, top_k=None)(texts)
    model.save_pretrained(directory + "-resaved")  # transformers writes the modeling file and auto_map back
    tokenizer.save_pretrained(directory + "-resaved")
    results[directory] = {"class": type(model).__name__, "logits": logits.tolist(), "served": served}
blocked = [name for name in sys.modules if name.split(".")[0] in ("prune", "attribution")]
print(json.dumps({"results": results, "blocked": blocked}))
"""

REMOTE_FAMILIES = FAMILIES  # every family headprune prunes, in one process


@pytest.fixture(scope="module")
def remote_loaded(tmp_path_factory) -> tuple[dict[str, Path], dict]:
    """Pruned checkpoints with the modeling file, and what one headprune-less process made of them
    (one process for all families: importing transformers dominates its time)."""
    root = tmp_path_factory.mktemp("remote")
    directories = {family: pruned_dir(root / family, family, remote_code=True) for family in REMOTE_FAMILIES}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-I", "-c", _REMOTE_LOADER, json.dumps(TEXTS), *map(str, directories.values())],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return directories, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", REMOTE_FAMILIES)
def test_remote_code_loads_without_headprune_with_the_same_logits(remote_loaded, family):
    directories, loaded = remote_loaded
    directory = directories[family]
    assert (directory / MODELING_FILE).read_text() == Path(modeling_headprune.__file__).read_text()
    config = json.loads((directory / "config.json").read_text())
    assert config[AUTO_MAP_KEY] == auto_map(family) and is_headprune_remote_code(config)

    model, tokenizer = load_model(directory)  # headprune's own loader still loads it, without the file
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    assert loaded["blocked"] == []
    result = loaded["results"][str(directory)]
    assert result["class"] == modeling_headprune.CLASSES[family].__name__
    got = torch.tensor(result["logits"])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    resaved = Path(f"{directory}-resaved")  # what transformers saved is again a headprune checkpoint
    assert is_headprune_remote_code(json.loads((resaved / "config.json").read_text()))
    assert (resaved / MODELING_FILE).read_text() == (directory / MODELING_FILE).read_text()
    reloaded, _ = load_model(resaved)
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(again, expected, atol=1e-5)
    served = torch.tensor([[e["score"] for e in sorted(row, key=lambda e: e["label"])] for row in result["served"]])
    labels = sorted(model.config.id2label.items(), key=lambda item: item[1])
    assert torch.allclose(served, expected.softmax(-1)[:, [i for i, _ in labels]], atol=1e-6)


def test_remote_code_is_off_by_default_and_dropped_on_resave(tmp_path):
    plain = pruned_dir(tmp_path, name="plain")
    assert not (plain / MODELING_FILE).exists()
    assert AUTO_MAP_KEY not in json.loads((plain / "config.json").read_text())

    carrying = pruned_dir(tmp_path, remote_code=True, name="carrying")
    model, tokenizer = load_model(carrying)
    resaved = save_pruned(model, tmp_path / "resaved", tokenizer)
    assert not (resaved / MODELING_FILE).exists()
    assert AUTO_MAP_KEY not in json.loads((resaved / "config.json").read_text())
    again = save_pruned(model, tmp_path / "again", tokenizer, remote_code=True)
    assert json.loads((again / "config.json").read_text())[AUTO_MAP_KEY] == auto_map("bert")


def test_is_headprune_remote_code_recognises_only_our_auto_map():
    ours = {"model_type": "bert", "headprune_kept_heads": [[0]], AUTO_MAP_KEY: auto_map("bert")}
    assert is_headprune_remote_code(ours)
    assert not is_headprune_remote_code({**ours, AUTO_MAP_KEY: {**auto_map("bert"), "AutoConfig": "x.Y"}})
    assert not is_headprune_remote_code({**ours, AUTO_MAP_KEY: auto_map("distilbert")})  # wrong family
    assert not is_headprune_remote_code({k: v for k, v in ours.items() if k != "headprune_kept_heads"})
    assert not is_headprune_remote_code({k: v for k, v in ours.items() if k != AUTO_MAP_KEY})
    assert not is_headprune_remote_code({**ours, AUTO_MAP_KEY: {"AutoModelForSequenceClassification": "evil.Model"}})
    assert not is_headprune_remote_code({**ours, "model_type": "gpt2"})


def test_the_modeling_file_imports_only_torch_transformers_and_the_standard_library():
    tree = ast.parse(Path(modeling_headprune.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports cannot work in a copied file"
            roots.add((node.module or "").split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "transformers"}


def test_the_modeling_file_knows_every_family_headprune_prunes():
    assert set(modeling_headprune.CLASSES) == set(instrument.FAMILIES) == set(FAMILIES)
    for model_type, family in instrument.FAMILIES.items():
        paths = modeling_headprune.FAMILIES[model_type]
        assert paths["layers"] == family.layers and paths["attention"] == family.attention
        assert paths["qkv"] == (family.query, family.key, family.value)
        assert paths["output"] == family.output and paths["output_inside_attention"] == family.output_inside_attention
        assert paths["intermediate"] == family.intermediate and paths["ffn_output"] == family.ffn_output


def test_cli_prune_remote_code_option(tmp_path):
    from attribution.scores import HeadScores
    from prune.cli import main

    model = sensitive(tiny_model("bert", layers=3, heads=4), seed=2)
    dense = save_pruned(model, tmp_path / "dense", tiny_tokenizer(tmp_path / "tok"))
    scores = HeadScores(torch.arange(12.0).reshape(3, 4), "synthetic").save(tmp_path / "scores.json")
    common = ["prune", "--model", str(dense), "--scores", str(scores), "--count", "5", "--quiet", "--out"]
    assert main([*common, str(tmp_path / "plain")]) == 0
    assert main([*common, str(tmp_path / "remote"), "--remote-code"]) == 0
    assert not (tmp_path / "plain" / MODELING_FILE).exists()
    assert (tmp_path / "remote" / MODELING_FILE).is_file()
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert is_headprune_remote_code(config) and config["headprune_kept_heads"][0] == []


def readme_blocks(marker: str) -> list[str]:
    """The README's ```python blocks whose text contains ``marker``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    return [block for block in blocks if marker in block]


def test_readme_pipeline_snippet_runs_as_written(tmp_path, monkeypatch):
    (block,) = readme_blocks("pipeline(\"text-classification\", model=model")
    pruned_dir(tmp_path, name="pruned")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    (top,) = namespace["classify"]("leave us stranded ... appalling.")
    probabilities = softmax_of(model, tokenizer, ["leave us stranded ... appalling."])[0]
    assert top["label"] == model.config.id2label[int(probabilities.argmax())]
    assert abs(top["score"] - float(probabilities.max())) < 1e-6


# --------------------------------------------------------------------------------------------
# The ONNX directory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_readme_onnxruntime_snippet_runs_on_an_exported_directory(tmp_path, monkeypatch, capsys, family):
    pytest.importorskip("onnxruntime")
    from prune.cli import main

    (block,) = readme_blocks("ort.InferenceSession(")
    directory = pruned_dir(tmp_path, family)
    if family == "roberta":  # as RoBERTa's own tokenizers: no token_type_ids, though the model takes them
        tokenizer_without_token_types().save_pretrained(directory)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", str(directory), "--format", "onnx", "--out", "onnx/"]) == 0
    assert "config.json and the tokenizer files" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]

    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    model, tokenizer = load_model(directory)
    texts = ["what a great day", "leave us stranded"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if family == "roberta":  # the snippet's zeros branch ran
        assert "token_type_ids" not in namespace["batch"]
        assert "token_type_ids" in [i.name for i in namespace["session"].get_inputs()]
    got = torch.from_numpy(namespace["logits"])
    assert got.shape == expected.shape == (2, model.config.num_labels)
    assert torch.allclose(got, expected, atol=1e-4)
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config["headprune_kept_heads"] == instrument.kept_heads(model) and AUTO_MAP_KEY not in config


def test_export_directory_drops_the_auto_map_and_replaces_only_an_earlier_export(tmp_path):
    pytest.importorskip("onnxruntime")
    from attribution.core.errors import HeadpruneError
    from prune.export import QUANTIZED_FILE, export_directory

    model, tokenizer = load_model(pruned_dir(tmp_path, remote_code=True))
    assert getattr(model.config, AUTO_MAP_KEY, None) is not None
    first = export_directory(model, tmp_path / "onnx", tokenizer)
    assert first.path == str(tmp_path / "onnx" / "model.onnx")
    assert AUTO_MAP_KEY not in json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert not (tmp_path / "onnx" / MODELING_FILE).exists()
    (tmp_path / "onnx" / QUANTIZED_FILE).write_bytes(b"stale")  # an earlier export's INT8 model
    export_directory(model, tmp_path / "onnx")  # replaced as a whole: nothing stale survives
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["config.json", "model.onnx"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(HeadpruneError, match="holds no model.onnx"):
        export_directory(model, tmp_path / "mine")
    with pytest.raises(HeadpruneError, match="is a directory"):
        export_directory(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------
# The recipe key
# --------------------------------------------------------------------------------------------


def test_recipe_export_remote_code_puts_the_modeling_file_in_the_run_model(tmp_path):
    from prune.pipeline import run_recipe
    from prune.pipeline.artifacts import StageRecord
    from prune.recipe import load_recipe
    from tests.tiny_recipe import tiny_recipe

    small = dict(
        score="score:\n  split: train\n  examples: 8\n  batch_size: 4\n  criteria:\n    random: {seed: 1}\n",
        sweep="", repair="", cost="", report="",
        prune="prune:\n  criterion: random\n  target: {fraction: 0.5}\n",
    )
    off = tiny_recipe(tmp_path, **small, export="export:\n  onnx: false\n")
    run_recipe(load_recipe(off), tmp_path / "run", progress=False)
    model_dir = tmp_path / "run" / "model"
    assert not (model_dir / MODELING_FILE).exists()
    assert "remote_code" not in StageRecord.load(tmp_path / "run" / "stages" / "prune.json").inputs

    on = tiny_recipe(tmp_path, **small, export="export:\n  onnx: false\n  remote_code: true\n")
    result = run_recipe(load_recipe(on), tmp_path / "run", progress=False)
    assert "prune" in result.ran  # the key is part of the prune stage's fingerprint
    assert (model_dir / MODELING_FILE).is_file()
    assert is_headprune_remote_code(json.loads((model_dir / "config.json").read_text()))
    assert MODELING_FILE in " ".join(StageRecord.load(tmp_path / "run" / "stages" / "prune.json").files)
    model, _ = load_model(model_dir)
    assert sum(instrument.heads_per_layer(model)) == 4  # half of 2 layers x 4 heads
