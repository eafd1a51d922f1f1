"""Shared fixtures: tiny random encoders of every supported family, and padded batches."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CamembertConfig,
    CamembertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

torch.set_num_threads(1)  # tiny models: threads only add overhead, and developers share the cores

FAMILIES = ("bert", "roberta", "electra", "xlm-roberta", "camembert", "distilbert", "mpnet")
VOCAB = 60


def tiny_model(family: str = "bert", layers: int = 3, heads: int = 4, labels: int = 3, seed: int = 0):
    """A randomly initialised sequence classifier, eval mode, dropout off (exact comparisons)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=8 * heads, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=37, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=64, pad_token_id=1 if family in ("roberta", "xlm-roberta", "camembert", "mpnet") else 0,
    )
    if family == "distilbert":
        config = DistilBertConfig(
            vocab_size=VOCAB, dim=8 * heads, n_layers=layers, n_heads=heads, hidden_dim=37, num_labels=labels,
            dropout=0.0, attention_dropout=0.0, max_position_embeddings=64, seq_classif_dropout=0.0,
        )
        return DistilBertForSequenceClassification(config).eval()
    if family == "mpnet":
        model = MPNetForSequenceClassification(MPNetConfig(**common, relative_attention_num_buckets=32)).eval()
        with torch.no_grad():  # a bias as large as the logits (std 0.02 at init would hide mistakes)
            model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)
        return model
    classes = {
        "bert": (BertConfig, BertForSequenceClassification),
        "roberta": (RobertaConfig, RobertaForSequenceClassification),
        "electra": (ElectraConfig, ElectraForSequenceClassification),
        "xlm-roberta": (XLMRobertaConfig, XLMRobertaForSequenceClassification),
        "camembert": (CamembertConfig, CamembertForSequenceClassification),
    }
    config_cls, model_cls = classes[family]
    extra = {"embedding_size": 8 * heads} if family == "electra" else {}
    return model_cls(config_cls(**common, **extra)).eval()


def sharp_model(seed: int = 3):
    """A tiny BERT with scaled-up query/value/classifier weights: attention far from uniform, a
    confident classifier, F far from linear in the attention, so attributions are large and
    quadrature errors visible (a random init at std 0.02 gives near-uniform everything)."""
    model = tiny_model("bert", seed=seed)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
            layer.attention.self.key.weight.mul_(8)
            layer.attention.self.value.weight.mul_(8)
        model.bert.pooler.dense.weight.mul_(20)
        model.classifier.weight.mul_(40)
    return model


def padded_batch(
    batch: int = 3, length: int = 7, seed: int = 1, lengths: list[int] | None = None, pad_id: int = 0
):
    """input_ids/attention_mask ``[B, T]`` with right padding (row i has ``lengths[i]`` tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    lengths = lengths or [length] + [max(2, length - 2 - 2 * i) for i in range(batch - 1)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, pad_id)
    ids[:, 0] = 2  # a fixed first token, like [CLS]
    return {"input_ids": ids, "attention_mask": mask}


def stock_attention(model) -> str:
    """The attention implementation a model runs when not instrumented: SDPA, except for MPNet, which
    computes attention inline (transformers reports it as "eager")."""
    return "eager" if model.config.model_type == "mpnet" else "sdpa"


def pad_id(model) -> int:
    return int(model.config.pad_token_id or 0)


@pytest.fixture
def bert():
    return tiny_model("bert")


@pytest.fixture
def batch():
    return padded_batch()
