"""Training through Accelerate (``prune.training``): on one CPU process a fine-tune is the plain
PyTorch loop bit for bit; two CPU processes (gloo), and gradient accumulation, give the weights
of one process (dropout off) within 1e-6; only the main process writes the model."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from attribution.core.errors import HeadpruneError
from prune.finetune import MAX_GRAD_NORM, WARMUP_FRACTION, WEIGHT_DECAY, finetune

WORDS = "good great fine nice bad awful poor sad the movie plot was very".split()
ROWS = 89  # 11 batches of 8 and a last one of 1 row: one process gets an empty shard of it


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("HEADPRUNE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-layer BERT without dropout (exact comparisons) and its tokenizer, saved; a CSV of
    labelled rows whose label is the sentiment word they contain."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(folder)
    data = tmp_path_factory.mktemp("data") / "reviews.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(150):
            positive = i % 2 == 0
            word = (WORDS[:4] if positive else WORDS[4:8])[i % 4]
            filler = " ".join(WORDS[8 + (i + j) % 5] for j in range(i % 6))
            writer.writerow([f"{filler} {word}".strip(), "pos" if positive else "neg"])
    return folder, data


def options(base: Path, data: Path, out: Path, **extra) -> dict:
    return dict(base=str(base), data=str(data), train_examples=ROWS, epochs=2, lr=1e-3, batch_size=8,
                max_length=16, seed=3, out_dir=out, progress=False, **extra)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def plain_loop(base: Path, data: Path) -> dict[str, torch.Tensor]:
    """The fine-tune written as the plain PyTorch loop it was before Accelerate (an independent
    implementation of the recipe: AdamW, warmup and linear decay, clipping, seeded epochs)."""
    import dataclasses

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from attribution.core.data import as_spec, iter_batches, label_names, load_splits

    spec = dataclasses.replace(as_spec(str(data)), max_length=16)
    splits = load_splits(spec)
    train = splits["train"].select(range(ROWS))
    names = label_names(splits)
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )
    total = 2 * math.ceil(ROWS / 8)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * total), total)
    model.train()
    for epoch in range(2):
        order = torch.randperm(ROWS, generator=torch.Generator().manual_seed(3 * 1000 + epoch)).tolist()
        for batch in iter_batches(train.select(order), tokenizer, batch_size=8, max_length=16):
            batch.pop("index")
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {name: value.detach() for name, value in model.state_dict().items()}


def test_one_process_is_the_plain_loop_bit_for_bit(tiny, tmp_path):
    base, data = tiny
    result = finetune(**options(base, data, tmp_path / "model"))
    trained, plain = weights(result.path), plain_loop(base, data)
    assert trained.keys() <= plain.keys()
    for name, value in trained.items():
        assert torch.equal(value, plain[name]), name
    meta = json.loads((result.path / "headprune_finetune.json").read_text())
    compute = {"processes": 1, "device": "cpu", "mixed_precision": "no", "gradient_accumulation_steps": 1}
    assert meta["compute"] == compute


def test_gradient_accumulation_gives_the_same_weights(tiny, tmp_path):
    """3 micro-batches per step (some empty in the last batch) = 1, up to float summation order;
    the global batch size and the schedule do not change, and neither does the cache key."""
    base, data = tiny
    one = finetune(**options(base, data, tmp_path / "one"))
    three = finetune(**options(base, data, tmp_path / "three", gradient_accumulation_steps=3))
    assert one.fingerprint == three.fingerprint
    a, b = weights(one.path), weights(three.path)
    moved = max(float((a[k] - weights_base(base).get(k, a[k])).abs().max()) for k in a)
    assert moved > 1e-3  # training did move the weights: the comparison below means something
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def weights_base(base: Path) -> dict[str, torch.Tensor]:
    """The base encoder's weights under the classifier's parameter names."""
    return {f"bert.{name}": value for name, value in weights(base).items()}


def test_bad_compute_options_are_one_line_errors(tiny, tmp_path):
    base, data = tiny
    with pytest.raises(HeadpruneError, match="mixed_precision must be one of no, bf16, fp16"):
        finetune(**options(base, data, tmp_path / "m", mixed_precision="fp32"))
    with pytest.raises(HeadpruneError, match="gradient_accumulation_steps must be an integer of at least 1"):
        finetune(**options(base, data, tmp_path / "m", gradient_accumulation_steps=0))
    assert not (tmp_path / "m").exists()


def _reset_accelerate() -> None:
    """Forget Accelerate's process state (a forked worker inherits the test process's)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


def _worker(base: str, data: str, out: str) -> None:
    _reset_accelerate()
    torch.set_num_threads(1)
    from attribution.core import processes

    rank = processes.process_index()
    result = finetune(**options(Path(base), Path(data), Path(out) / "two", gradient_accumulation_steps=2))
    # the main process saved the model before any process returned
    seen = sorted(p.name for p in result.path.iterdir())
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "processes": processes.num_processes(), "path": str(result.path), "seen": seen,
        "metrics": result.metrics, "cached": result.cached,
    }))


def test_two_processes_equal_one(tiny, tmp_path):
    from accelerate import debug_launcher

    base, data = tiny
    debug_launcher(_worker, args=(str(base), str(data), str(tmp_path)), num_processes=2)
    _reset_accelerate()
    single = finetune(**options(base, data, tmp_path / "one"))
    two = json.loads((tmp_path / "rank0.json").read_text())
    other = json.loads((tmp_path / "rank1.json").read_text())
    assert (two["processes"], two["rank"], other["rank"]) == (2, 0, 1)
    assert two["path"] == other["path"] == str(tmp_path / "two")
    assert "model.safetensors" in other["seen"] and "headprune_finetune.json" in other["seen"]
    assert not two["cached"] and not other["cached"]
    assert two["metrics"] == other["metrics"]  # evaluation gathered from both shards
    meta = json.loads((tmp_path / "two" / "headprune_finetune.json").read_text())
    assert meta["compute"]["processes"] == 2 and meta["compute"]["gradient_accumulation_steps"] == 2
    assert meta["fingerprint"] == single.fingerprint and meta["steps"] == 2 * math.ceil(ROWS / 8)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    a, b = weights(single.path), weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    assert two["metrics"]["validation"]["accuracy"] == pytest.approx(single.metrics["validation"]["accuracy"])


# ---- the heal -------------------------------------------------------------------------------

HEAL = dict(max_steps=11, eval_every=3, patience=100, lr=1e-3, batch_size=8, seed=5, alpha=0.7, progress=False)


def _heal_world(root: Path):
    """Teacher, a noisy student (dropout off: exact comparisons), tokenizer, train and held-out rows."""
    import copy

    from tests.conftest import tiny_model
    from tests.prune_helpers import sensitive, tiny_dataset, tiny_tokenizer

    teacher = sensitive(tiny_model("bert", layers=2, heads=2, seed=1), seed=1)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.15)
    # A key bias shifts every score of a query alike, and softmax ignores that: its true gradient is
    # 0, and Adam would turn the float noise of that 0 into lr-sized steps. Frozen, the comparison
    # below is of real gradients only.
    for name, param in student.named_parameters():
        param.requires_grad_(not name.endswith("attention.self.key.bias"))
    # 45 rows: batches of 8 and a last one of 5, split 3 + 2 over two processes
    return teacher, student, tiny_tokenizer(root / "tok"), tiny_dataset(45, seed=12), tiny_dataset(16, seed=13)


class _Killed(Exception):
    pass


def _heal_worker(out: str) -> None:
    import copy

    from attribution.core import processes
    from prune.heal import heal
    from prune.surgery import remove_heads

    _reset_accelerate()
    torch.set_num_threads(1)
    root, rank = Path(out), processes.process_index()
    teacher, start, tokenizer, train, held_out = _heal_world(root / f"world{rank}")
    found: dict = {"processes": processes.num_processes()}

    whole = copy.deepcopy(start)
    result = heal(whole, teacher, tokenizer, train, held_out, checkpoint_dir=root / "whole", **HEAL,
                  gradient_accumulation_steps=2)
    found["whole"] = {"history": [vars(p) for p in result.history], "steps": result.steps}
    torch.save(whole.state_dict(), root / f"whole{rank}.pt")

    killed, seen = copy.deepcopy(start), {"n": 0}

    def kill(module, args, kwargs):  # every process is killed in the forward of step 8
        if module.training:
            seen["n"] += 1
            if seen["n"] > 7:
                raise _Killed

    handle = killed.register_forward_pre_hook(kill, with_kwargs=True)
    try:
        heal(killed, teacher, tokenizer, train, held_out, checkpoint_dir=root / "killed", **HEAL)
    except _Killed:
        found["killed"] = True
    handle.remove()
    processes.barrier()
    if rank == 0:  # the checkpoint as the kill left it, for a resume on one process
        shutil.copytree(root / "killed", root / "killed-copy")
    processes.barrier()
    resumed = copy.deepcopy(start)
    result = heal(resumed, teacher, tokenizer, train, held_out, checkpoint_dir=root / "killed", **HEAL)
    found["resumed"] = {"from": result.resumed_from, "history": [vars(p) for p in result.history]}
    torch.save(resumed.state_dict(), root / f"resumed{rank}.pt")

    # an absurd learning rate from a start that is 100% right on the held-out rows: never worse
    from attribution.core.predict import predict_logits

    wild = copy.deepcopy(start)
    predicted = predict_logits(start, tokenizer, held_out).argmax(-1).tolist()
    perfect = held_out.remove_columns("label").add_column("label", predicted).cast(held_out.features)
    result = heal(wild, teacher, tokenizer, train, perfect, **{**HEAL, "lr": 50.0, "max_steps": 4, "eval_every": 2})
    found["wild"] = {
        "hurt": min(p.accuracy for p in result.history[1:]) < result.start_accuracy == 1.0,
        "restored": result.restored_start,
        "start": all(torch.equal(value, start.state_dict()[name]) for name, value in wild.state_dict().items()),
    }

    emptied = copy.deepcopy(start)  # a layer without heads: empty weights that get no gradient
    remove_heads(emptied, {(0, 0), (0, 1)})
    heal(emptied, teacher, tokenizer, train, held_out, **{**HEAL, "max_steps": 4})
    torch.save(emptied.state_dict(), root / f"emptied{rank}.pt")
    empty = [p.requires_grad for p in emptied.parameters() if p.numel() == 0]
    found["unfrozen"] = len(empty) == 7 and all(empty)  # layer 0's q, k, v, output weights: trainable, as given

    budget = copy.deepcopy(start)  # the clocks differ: every process must stop at the main process's step
    result = heal(budget, teacher, tokenizer, train, held_out, budget_seconds=2.0,
                  **{**HEAL, "max_steps": None, "eval_every": 5})
    found["budget"] = {"steps": result.steps, "stopped": result.stopped_because}
    Path(out, f"heal{rank}.json").write_text(json.dumps(found))


def test_two_process_heal_equals_one_resumes_after_a_kill_and_is_never_worse(tmp_path):
    import copy

    from accelerate import debug_launcher

    from prune.heal import RESULT_FILE, STATE_FILE, heal
    from prune.surgery import remove_heads

    debug_launcher(_heal_worker, args=(str(tmp_path),), num_processes=2)
    _reset_accelerate()
    teacher, start, tokenizer, train, held_out = _heal_world(tmp_path / "single")
    single = copy.deepcopy(start)
    reference = heal(single, teacher, tokenizer, train, held_out, **HEAL)
    ranks = [json.loads((tmp_path / f"heal{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["processes"] == ranks[1]["processes"] == 2
    assert ranks[0] == {**ranks[1], "processes": 2}  # every process took the same decisions
    found = ranks[0]

    # two processes (and two micro-batches each) = one process, within float summation order
    assert found["whole"]["steps"] == reference.steps == 11
    assert [p["accuracy"] for p in found["whole"]["history"]] == [p.accuracy for p in reference.history]
    losses = [p["loss"] for p in found["whole"]["history"][1:]]
    assert losses == pytest.approx([p.loss for p in reference.history[1:]], rel=1e-5)
    moved = False
    for rank in (0, 1):
        whole = torch.load(tmp_path / f"whole{rank}.pt", weights_only=True)
        for name, value in single.state_dict().items():
            torch.testing.assert_close(whole[name], value, rtol=0, atol=1e-6)
            moved = moved or not torch.allclose(value, start.state_dict()[name], atol=1e-4)
    assert moved and reference.best_step > 0  # the heal did change the weights

    # killed at step 8 on both processes, resumed from the checkpoint of step 6: the same heal
    assert found["killed"] and found["resumed"]["from"] == 6
    assert [p["accuracy"] for p in found["resumed"]["history"]] == [p.accuracy for p in reference.history]
    losses = [p["loss"] for p in found["resumed"]["history"][1:]]
    assert losses == pytest.approx([p.loss for p in reference.history[1:]], rel=1e-5)
    resumed = torch.load(tmp_path / "resumed0.pt", weights_only=True)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6)
    assert (tmp_path / "killed" / RESULT_FILE).is_file() and (tmp_path / "killed" / STATE_FILE).is_file()
    # the checkpoint of the two killed processes resumes on one process too
    assert not (tmp_path / "killed-copy" / RESULT_FILE).exists()
    alone = copy.deepcopy(start)
    result = heal(alone, teacher, tokenizer, train, held_out, checkpoint_dir=tmp_path / "killed-copy", **HEAL)
    assert result.resumed_from == 6 and [p.accuracy for p in result.history] == [p.accuracy for p in reference.history]
    for name, value in single.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[name], value, rtol=0, atol=1e-6)

    assert found["wild"] == {"hurt": True, "restored": True, "start": True}
    emptied = copy.deepcopy(start)
    remove_heads(emptied, {(0, 0), (0, 1)})
    heal(emptied, teacher, tokenizer, train, held_out, **{**HEAL, "max_steps": 4})
    two = torch.load(tmp_path / "emptied1.pt", weights_only=True)
    for name, value in emptied.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-6)
    assert found["unfrozen"]
    assert found["budget"]["stopped"] == "budget" and found["budget"]["steps"] >= 1


# ---- a recipe under torchrun ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_a_recipe_fine_tunes_and_heals_on_two_processes_as_on_one(tmp_path, monkeypatch):
    """``torchrun --nproc_per_node 2 -m prune.cli run``: the finetune and heal stages run on both
    processes (a stage that ran on one would hang the other's collectives); the fine-tuned model
    is the one-process model within 1e-6 (dropout off), and the heal runs to its step limit."""
    import os
    import subprocess

    from tests.test_compress_stages import COMPRESS
    from tests.tiny_recipe import tiny_recipe

    finetune_section = "finetune:\n  train_examples: 40\n  epochs: 1\n  lr: 1.0e-3\n  batch_size: 8\n  seed: 0\n"
    recipe = tiny_recipe(tmp_path, **{**COMPRESS, "quantize": "", "cost": "cost: null\n", "finetune": finetune_section})
    config = tmp_path / "world" / "model" / "config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent),
           "HEADPRUNE_CACHE": str(tmp_path / "cache-two")}
    command = ["torchrun", "--nproc_per_node", "2", "-m", "prune.cli", "run", str(recipe), "--out",
               str(tmp_path / "two"), "--quiet"]
    done = subprocess.run(command, env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "finetune.json").read_text())
    meta = json.loads((Path(two["path"]) / "headprune_finetune.json").read_text())
    assert meta["compute"]["processes"] == 2 and two["path"].startswith(str(tmp_path / "cache-two"))
    heal_run = json.loads((tmp_path / "two" / "compress" / "heal.json").read_text())
    assert heal_run["result"]["steps"] == 4 and heal_run["result"]["stopped_because"] == "max_steps"
    assert (tmp_path / "two" / "compress" / "healed" / "config.json").is_file()

    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache-one"))
    one = finetune(str(tmp_path / "world" / "model"), _spec(recipe), train_examples=40, epochs=1, lr=1e-3,
                   batch_size=8, max_length=16, seed=0, progress=False)
    assert one.fingerprint == meta["fingerprint"]
    a, b = weights(one.path), weights(Path(two["path"]))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def _spec(recipe: Path):
    """The data spec of ``recipe`` (what the finetune stage trains on)."""
    from attribution.core.data import DataSpec
    from prune.recipe import load_recipe

    return DataSpec(**load_recipe(recipe).section("data"))


# ---- mixed precision ------------------------------------------------------------------------

_BF16 = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from prune.finetune import finetune
base, data, out = sys.argv[1:4]
result = finetune(base, data, train_examples=24, epochs=1, lr=1e-3, batch_size=8, max_length=16, seed=3,
                  out_dir=Path(out), progress=False)
print(json.dumps({"fingerprint": result.fingerprint}))
"""


def test_bf16_from_the_launch_is_a_model_of_its_own(tiny, tmp_path):
    """``ACCELERATE_MIXED_PRECISION=bf16`` (what ``accelerate launch --mixed_precision bf16`` sets)
    trains under bf16 autocast on the CPU: a model of its own under its own cache key. A process
    whose Accelerate already runs another precision refuses with one line."""
    import os
    import subprocess
    import sys

    base, data = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent),
           "ACCELERATE_MIXED_PRECISION": "bf16", "HEADPRUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _BF16, str(base), str(data), str(tmp_path / "bf16")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((tmp_path / "bf16" / "headprune_finetune.json").read_text())
    assert meta["compute"]["mixed_precision"] == "bf16" and meta["config"]["mixed_precision"] == "bf16"
    full = finetune(str(base), str(data), train_examples=24, epochs=1, lr=1e-3, batch_size=8, max_length=16, seed=3,
                    out_dir=tmp_path / "full", progress=False)
    assert full.fingerprint != meta["fingerprint"] and "mixed_precision" not in json.loads(
        (tmp_path / "full" / "headprune_finetune.json").read_text())["config"]
    a, b = weights(full.path), weights(tmp_path / "bf16")
    assert all(a[name].dtype == b[name].dtype == torch.float32 for name in a)  # weights stay float32
    assert any(not torch.equal(a[name], b[name]) for name in a)  # bf16 arithmetic: other bits
    # this process already runs Accelerate in full precision
    with pytest.raises(HeadpruneError, match="cannot set up Accelerate for mixed precision bf16"):
        finetune(**options(base, data, tmp_path / "again", mixed_precision="bf16"))
    assert not (tmp_path / "again").exists()


def test_cli_refuses_bad_compute_options_in_one_line(tiny, tmp_path, capsys):
    from prune.cli import main

    base, data = tiny
    for flag, value, message in (
        ("--gradient-accumulation-steps", "0", "gradient_accumulation_steps must be an integer of at least 1"),
        ("--mixed-precision", "fp32", "invalid choice: 'fp32'"),
    ):
        code = main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "m"), flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], err
    assert not (tmp_path / "m").exists()
