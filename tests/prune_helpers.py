"""Helpers for the pruning tests: a word-level tokenizer matching the tiny models' vocabulary, and
small labelled data sets of it (no network, no real weights)."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
from transformers import BertTokenizerFast

from tests.conftest import VOCAB

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def tiny_tokenizer(directory: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer whose ids stay below the tiny models' vocabulary size (60)."""
    directory.mkdir(parents=True, exist_ok=True)
    # transformers 5: BertTokenizerFast(vocab_file=...) keeps only the special tokens; a dict works
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(SPECIAL + WORDS)}, do_lower_case=False)


def tiny_dataset(rows: int, seed: int = 0, labels: int = 3, max_words: int = 9) -> datasets.Dataset:
    """``rows`` random sentences of 1..max_words words with labels in 0..labels-1 (varied lengths,
    so batches are padded)."""
    rng = random.Random(seed)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(rows)]
    label = [rng.randrange(labels) for _ in range(rows)]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=[str(i) for i in range(labels)])}
    )
    return datasets.Dataset.from_dict({"text": text, "label": label}, features=features)


def sensitive(model, seed: int = 0, std: float = 0.3):
    """Re-draw ``model``'s linear and embedding weights with a larger spread, so every head visibly
    moves the logits (the default 0.02 init makes tiny models nearly constant functions and
    equality tests weak). Returns the model."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=generator) * std)
    return model
