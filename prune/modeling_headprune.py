"""A pruned headprune checkpoint as plain transformers code, for ``trust_remote_code=True``.

This file is copied, unchanged, into a pruned checkpoint when the user asks for it
(``save_pruned(..., remote_code=True)``, ``headprune prune --remote-code``); the checkpoint's
``config.json`` then names one of the classes below under ``auto_map``, so that::

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

builds the right shapes without headprune installed. It imports only ``torch`` and
``transformers`` (never headprune): it must run wherever the checkpoint goes.

What a pruned checkpoint records (in ``config.json``, beside the unchanged original sizes):

- ``headprune_kept_heads``: per layer, the original indices of the attention heads that remain.
  Layer ``l`` keeping ``n_l`` heads has query/key/value projections ``hidden -> n_l * d_h`` and an
  output projection ``n_l * d_h -> hidden`` (``d_h = hidden / num_attention_heads``, from the
  config). A layer with no heads left contributes its output projection's bias only.
- ``headprune_kept_neurons`` (only when feed-forward neurons were removed): per layer, the original
  indices of the feed-forward neurons that remain: intermediate ``hidden -> F_l``, output
  ``F_l -> hidden``; ``F_l = 0`` contributes the output bias only.

Each class below is the stock transformers classifier whose encoder is resized to those widths
right after construction; ``from_pretrained`` then loads the saved weights into exactly those
shapes. The stock forward is used everywhere except in a layer with no heads, whose attention
returns an empty context (``[B, T, 0]``) instead of running attention over zero heads, and in
MPNet's attention, which first takes the rows of its kept heads from the relative position bias
the encoder computes once for all heads.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
import transformers
from torch import nn

KEPT_HEADS = "headprune_kept_heads"
KEPT_NEURONS = "headprune_kept_neurons"

# model_type -> where its pieces are, as attribute paths (from the base model to the layers; from
# a layer to the attention module, its query/key/value, the head output projection, and the
# feed-forward intermediate and output linears), whether the head output projection sits inside
# the attention module (DistilBERT, MPNet), and whether the attention module is handed a per-head
# relative position bias ``[B, H, T, T]`` computed once for all layers (MPNet).
FAMILIES: dict[str, dict[str, Any]] = {
    **{
        model_type: {
            "layers": "encoder.layer", "attention": "attention.self", "qkv": ("query", "key", "value"),
            "output": "attention.output.dense", "output_inside_attention": False,
            "intermediate": "intermediate.dense", "ffn_output": "output.dense",
        }
        for model_type in ("bert", "roberta", "electra", "xlm-roberta", "camembert")
    },
    "distilbert": {
        "layers": "transformer.layer", "attention": "attention", "qkv": ("q_lin", "k_lin", "v_lin"),
        "output": "attention.out_lin", "output_inside_attention": True,
        "intermediate": "ffn.lin1", "ffn_output": "ffn.lin2",
    },
    "mpnet": {
        "layers": "encoder.layer", "attention": "attention.attn", "qkv": ("q", "k", "v"),
        "output": "attention.attn.o", "output_inside_attention": True,
        "intermediate": "intermediate.dense", "ffn_output": "output.dense", "position_bias": True,
    },
}


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _replace(obj: Any, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    setattr(_get(obj, ".".join(parents)) if parents else obj, name, module)


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A new ``nn.Linear`` of the given shape on ``old``'s device and dtype (weights come from the
    checkpoint; initialising a zero-width one warns, which is meaningless here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(
            in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )


def _no_heads_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, None]:
    # No heads: the context [B, T, 0] is empty, so the output projection yields its bias.
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    inner = getattr(self, "headprune_inner_output", None)
    return (getattr(self, inner)(context) if inner else context), None


def _bias_of_kept_heads_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None, position_bias: Any = None,
    *args: Any, **kwargs: Any,
) -> Any:
    # MPNet's encoder computes one relative position bias [B, H, T, T] for the original H heads and
    # hands it to every layer: a layer keeps the rows of its remaining heads, in their order.
    if position_bias is not None:
        position_bias = position_bias[:, self.headprune_bias_heads]
    return self.headprune_stock_forward(hidden_states, attention_mask, position_bias, *args, **kwargs)


def _check(value: Any, key: str, layers: int) -> list[list[int]]:
    if not isinstance(value, list) or len(value) != layers or not all(isinstance(k, list) for k in value):
        raise ValueError(f"config.json: {key} must list, for each of the {layers} layers, the kept indices")
    return value


def resize_to_config(model: transformers.PreTrainedModel) -> None:
    """Resize ``model``'s encoder to the heads and neurons its config records (see the module docstring)."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"model type {config.model_type!r} is not one headprune prunes ({', '.join(FAMILIES)})")
    layers = list(_get(model.base_model, family["layers"]))
    heads = getattr(config, KEPT_HEADS, None)
    neurons = getattr(config, KEPT_NEURONS, None)
    for index, layer in enumerate(layers):
        if heads is not None:
            keep = _check(heads, KEPT_HEADS, len(layers))[index]
            attention = _get(layer, family["attention"])
            width = len(keep) * attention.attention_head_size
            for name in family["qkv"]:
                old = _get(attention, name)
                _replace(attention, name, _resized(old, old.in_features, width))
            old = _get(layer, family["output"])
            _replace(layer, family["output"], _resized(old, width, old.out_features))
            for count in ("num_attention_heads", "n_heads"):
                if hasattr(attention, count):
                    setattr(attention, count, len(keep))
            if hasattr(attention, "all_head_size"):
                attention.all_head_size = width
            if not keep:
                if family["output_inside_attention"]:
                    attention.headprune_inner_output = family["output"].rsplit(".", 1)[-1]
                attention.forward = types.MethodType(_no_heads_forward, attention)
            elif family.get("position_bias"):
                attention.headprune_bias_heads = list(keep)
                attention.headprune_stock_forward = attention.forward
                attention.forward = types.MethodType(_bias_of_kept_heads_forward, attention)
        if neurons is not None:
            width = len(_check(neurons, KEPT_NEURONS, len(layers))[index])
            old = _get(layer, family["intermediate"])
            _replace(layer, family["intermediate"], _resized(old, old.in_features, width))
            old = _get(layer, family["ffn_output"])
            _replace(layer, family["ffn_output"], _resized(old, width, old.out_features))


class HeadprunedBertForSequenceClassification(transformers.BertForSequenceClassification):
    """``BertForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


class HeadprunedRobertaForSequenceClassification(transformers.RobertaForSequenceClassification):
    """``RobertaForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


class HeadprunedElectraForSequenceClassification(transformers.ElectraForSequenceClassification):
    """``ElectraForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


class HeadprunedXLMRobertaForSequenceClassification(transformers.XLMRobertaForSequenceClassification):
    """``XLMRobertaForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


class HeadprunedCamembertForSequenceClassification(transformers.CamembertForSequenceClassification):
    """``CamembertForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


class HeadprunedDistilBertForSequenceClassification(transformers.DistilBertForSequenceClassification):
    """``DistilBertForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


class HeadprunedMPNetForSequenceClassification(transformers.MPNetForSequenceClassification):
    """``MPNetForSequenceClassification`` with the pruned widths of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_config(self)


# model_type -> the class ``auto_map`` names for AutoModelForSequenceClassification.
CLASSES: dict[str, type[transformers.PreTrainedModel]] = {
    "bert": HeadprunedBertForSequenceClassification,
    "roberta": HeadprunedRobertaForSequenceClassification,
    "electra": HeadprunedElectraForSequenceClassification,
    "xlm-roberta": HeadprunedXLMRobertaForSequenceClassification,
    "camembert": HeadprunedCamembertForSequenceClassification,
    "distilbert": HeadprunedDistilBertForSequenceClassification,
    "mpnet": HeadprunedMPNetForSequenceClassification,
}
