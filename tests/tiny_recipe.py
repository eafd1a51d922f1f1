"""A tiny offline world for recipe tests: a random BERT with a WordPiece tokenizer built from a
vocabulary file, a CSV of a few dozen labelled rows, and a recipe that runs every stage on them."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = [
    "good", "bad", "great", "awful", "movie", "day", "food", "service", "really", "not", "very", "the", "a",
    "was", "is", "and", "but", "love", "hate", "fine", "okay", "today", "people", "place", "time", "so",
]  # fmt: skip


def tiny_model_dir(root: Path, *, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A saved BertForSequenceClassification (2 labels, neg/pos) with its tokenizer, no network."""
    root.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # transformers 5: BertTokenizerFast(vocab_file=...) keeps only the special tokens; a dict works
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(tokens)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=8 * heads,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # sharper than the std-0.02 init: attention far from uniform, real differences
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(6)
            layer.attention.self.key.weight.mul_(6)
        model.classifier.weight.mul_(30)
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_csv(path: Path, rows: int = 120, seed: int = 0) -> Path:
    """``text,label`` rows of random words; the label says whether "good"/"great"/"love" occurs."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(rows):
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        label = "pos" if {"good", "great", "love"} & set(words) else "neg"
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_recipe(tmp: Path, **sections: str) -> Path:
    """A recipe over the tiny model and CSV exercising every stage; ``sections`` replace YAML blocks."""
    model = tiny_model_dir(tmp / "world")
    data = tiny_csv(tmp / "world" / "data.csv")
    blocks = {
        "model": f"model: {model}\n",
        "data": f"data:\n  name: {data}\n  text_column: text\n  label_column: label\n  max_length: 16\n",
        "score": (
            "score:\n  split: train\n  examples: 12\n  batch_size: 4\n  shard_size: 4\n  criteria:\n"
            "    attattr: {n_steps: 3, integration: gausslegendre}\n    taylor: {}\n    fisher: {}\n"
            "    attention: {}\n    random: {seed: 1}\n"
        ),
        "sweep": "sweep:\n  fractions: [0.25, 0.5, 0.75]\n  split: validation\n  examples: null\n  batch_size: 8\n",
        "prune": "prune:\n  criterion: best\n  target: {max_drop: 0.5}\n",
        "repair": "repair:\n  split: train\n  examples: 16\n  batch_size: 8\n",
        "evaluate": "evaluate:\n  split: test\n  metrics: [accuracy, macro_f1]\n  batch_size: 8\n",
        "cost": "cost:\n  batch_sizes: [1, 4]\n  repeats: 2\n",
        "export": "export:\n  check_examples: 6\n",
        "report": "report:\n  title: tiny test run\n",
    }
    blocks.update(sections)
    path = tmp / "recipe.yaml"
    path.write_text("".join(b for b in blocks.values() if b))
    return path
