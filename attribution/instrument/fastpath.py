"""Pieces of the encoder run separately: from a given layer on, one layer's heads, an injected
attention output, and the last layer computed for the first token only (AttAttr's fast path)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError
from attribution.instrument.families import (
    BERT_LIKE,
    attention_modules,
    attention_scaling,
    encoder_layers,
    head_bias_mask,
    kept_heads,
    model_family,
    output_projection,
    submodule,
)
from attribution.instrument.probe import apply_gates, headprune_attention

# --------------------------------------------------------------------------------------------
# Running the encoder from a given layer
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_at_layer(model: PreTrainedModel, layer: int, hidden_states: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward pass feeds ``hidden_states`` ``[B, T, D]`` into encoder ``layer``.

    The layers below are skipped (they return ``hidden_states`` unchanged), so only layers
    ``layer..L-1`` and the task head compute. The batch passed to the model must have the same
    ``B`` and ``T``: its ids still drive the padding mask (the embeddings compute and are ignored).
    """
    layers = encoder_layers(model)
    if not 0 <= layer < len(layers):
        raise HeadpruneError(f"layer {layer} out of range 0..{len(layers) - 1}")
    result = (hidden_states,) if model_family(model).layer_returns_tuple else hidden_states

    def skipped(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor | tuple[torch.Tensor]:
        return result

    try:
        for lower in layers[:layer]:
            lower.forward = types.MethodType(skipped, lower)
        yield
    finally:
        for lower in layers[:layer]:
            lower.__dict__.pop("forward", None)


def head_values(model: PreTrainedModel, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """Per-head values ``[B, H_l, T, d_h]`` of ``layer`` for its input ``hidden_states`` ``[B, T, D]``."""
    family = model_family(model)
    attention = attention_modules(model)[layer]
    bsz, seq, _ = hidden_states.shape
    value = submodule(attention, family.value)(hidden_states)
    return value.view(bsz, seq, -1, attention.attention_head_size).transpose(1, 2)


def project_heads(model: PreTrainedModel, layer: int, context: torch.Tensor) -> torch.Tensor:
    """Head outputs ``context`` ``[B, H_l, T, d_h]`` (before gating) through the persistent gates and
    the output projection *without its bias*: ``[B, T, D]``. Linear in ``context``."""
    attention = attention_modules(model)[layer]
    bsz, _, seq, _ = context.shape
    gated = apply_gates(attention, None, layer, context).transpose(1, 2).reshape(bsz, seq, -1)
    return nn.functional.linear(gated, output_projection(model, layer).weight)


@contextlib.contextmanager
def inject_attention_output(model: PreTrainedModel, layer: int, output: torch.Tensor) -> Iterator[None]:
    """Inside the block, layer ``layer``'s attention (heads and output projection, before dropout,
    residual and LayerNorm) outputs ``output`` ``[B, T, D]`` (its first positions when the layer
    computes fewer) instead of computing it.

    For AttAttr: scaling a layer's attention by alpha makes this ``alpha * P + b`` with
    ``P = project_heads(A @ V)`` fixed, so the scaled copies need neither the layer's projections
    nor ``[B, H, T, T]`` tensors, and the gradient with respect to the attention follows from the
    gradient with respect to ``output`` by two products per layer once the steps are summed.
    """
    attention = attention_modules(model)[layer]
    projection = output_projection(model, layer)
    if not kept_heads(model)[layer]:
        raise HeadpruneError(f"layer {layer} has no heads left to inject an attention output into")

    inside = any(module is projection for module in attention.modules())  # DistilBERT's out_lin

    def heads(self: nn.Module, hidden_states: torch.Tensor, *args: object, **kwargs: object):
        # a stand-in with the right number of positions; the projection below ignores its values
        return (projection(hidden_states) if inside else hidden_states), None

    def project(self: nn.Module, stand_in: torch.Tensor) -> torch.Tensor:
        return output[:, : stand_in.shape[1]]

    # An instance forward already installed (MPNet's inline attention) comes back on exit.
    previous = {id(m): m.__dict__.get("forward") for m in (attention, projection)}
    try:
        attention._headprune_output = output
        attention.forward = types.MethodType(heads, attention)
        projection.forward = types.MethodType(project, projection)
        yield
    finally:
        attention.__dict__.pop("_headprune_output", None)
        for module, function in ((attention, heads), (projection, project)):
            if "forward" in module.__dict__ and module.forward.__func__ is function:
                del module.forward
                if previous[id(module)] is not None:
                    module.forward = previous[id(module)]


def reads_first_token_only(model: PreTrainedModel) -> bool:
    """True when the task head reads only the first token of the last hidden state: the
    sequence-classification heads of every supported family do (BERT's pooler, RoBERTa's and
    ELECTRA's classification heads, DistilBERT's pre-classifier all take position 0)."""
    return type(model).__name__.endswith("ForSequenceClassification")


@contextlib.contextmanager
def first_token_last_layer(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block the last encoder layer computes only the first token's output.

    Its keys and values still come from every token, so the first token's output, and hence the
    classifier's logits, are unchanged; the last hidden state becomes ``[B, 1, D]``. This saves
    nearly a whole layer per forward and backward pass. A replacement given to the probe for that
    layer keeps its full ``[B, H, T, T]`` shape; only its first query row is used (the others get
    zero gradient, correctly: they cannot change the output). No-op for other task heads.
    """
    if not reads_first_token_only(model):
        yield
        return
    family = model_family(model)
    last = encoder_layers(model)[-1]
    forward = FIRST_TOKEN_FORWARDS[family.layout]
    try:
        last.forward = types.MethodType(forward, last)
        yield
    finally:
        last.__dict__.pop("forward", None)


def _first_token_context(
    attention: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
    names: tuple[str, str, str],
) -> torch.Tensor:
    """The concatenated head outputs ``[B, 1, H_l * d_h]`` for the first query position only."""
    bsz, seq, _ = hidden_states.shape
    if "_headprune_output" in attention.__dict__:  # inject_attention_output: a one-position stand-in
        return hidden_states[:, :1]
    if getattr(attention, "headprune_kept_heads", None) == []:  # a layer pruned to zero heads
        return hidden_states.new_zeros(bsz, 1, 0)
    d_h = attention.attention_head_size
    query, key, value = (getattr(attention, name) for name in names)
    probe, layer = getattr(attention, "_headprune_probe", None) or (None, -1)
    wants_probs = probe is not None and (layer in probe.replace or probe._wants(layer))
    if not wants_probs and not attention.training:
        return _first_token_context_absorbed(attention, hidden_states, attention_mask, query, key, value)
    q = query(hidden_states[:, :1]).view(bsz, 1, -1, d_h).transpose(1, 2)
    k = key(hidden_states).view(bsz, seq, -1, d_h).transpose(1, 2)
    v = value(hidden_states).view(bsz, seq, -1, d_h).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1, :]
    dropout = attention.dropout.p if attention.training else 0.0
    context, _ = headprune_attention(
        attention, q, k, v, attention_mask, scaling=attention_scaling(attention), dropout=dropout
    )
    return context.reshape(bsz, 1, -1)


def _first_token_context_absorbed(
    attention: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
    query: nn.Linear, key: nn.Linear, value: nn.Linear,
) -> torch.Tensor:
    """:func:`_first_token_context` without projecting every token to keys and values.

    With one query per head, ``q . (W_k x_j + b_k) = (W_k^T q) . x_j + q . b_k``: the query is
    carried back through the key projection once, and the bias term, the same for every key, cancels
    in the softmax. Since each head's probabilities sum to one, ``sum_j p_j (W_v x_j + b_v) =
    W_v (sum_j p_j x_j) + b_v``. Per token this costs ``2 * heads * D`` multiply-adds instead of
    ``2 * D * D`` for the key and value projections: the last layer of a classifier becomes
    almost free. Same numbers up to float rounding.
    """
    bsz, seq, dim = hidden_states.shape
    d_h = attention.attention_head_size
    heads = query.out_features // d_h
    q = query(hidden_states[:, 0]).view(bsz, heads, d_h)
    q_in_input_space = torch.einsum("bhd,hdk->bhk", q, key.weight.view(heads, d_h, dim))  # [B, H, D]
    scores = torch.bmm(q_in_input_space, hidden_states.transpose(1, 2)) * attention_scaling(attention)  # [B, H, T]
    if attention_mask is not None:
        row = attention_mask[:, :, 0, :] if attention_mask.dim() == 4 else attention_mask[:, None, :]
        if row.dtype == torch.bool:
            scores = scores.masked_fill(~row, torch.finfo(scores.dtype).min)
        else:
            scores = scores + row
    mixed = torch.bmm(torch.softmax(scores, dim=-1), hidden_states)  # [B, H, D]
    context = torch.einsum("bhk,hdk->bhd", mixed, value.weight.view(heads, d_h, dim))
    if value.bias is not None:
        context = context + value.bias.view(heads, d_h)
    probe, layer = getattr(attention, "_headprune_probe", None) or (None, -1)
    context = context[:, :, None, :]  # [B, H, 1, d_h]
    if probe is not None:
        context = probe._record_context(layer, context)
    context = apply_gates(attention, probe, layer, context)
    return context.transpose(1, 2).reshape(bsz, 1, -1)


def _bert_first_token_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
    *args: object, **kwargs: object,
) -> torch.Tensor:
    family = BERT_LIKE
    context = _first_token_context(
        self.attention.self, hidden_states, attention_mask, (family.query, family.key, family.value)
    )
    attention_output = self.attention.output(context, hidden_states[:, :1])
    return self.output(self.intermediate(attention_output), attention_output)


def _distilbert_first_token_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
    *args: object, **kwargs: object,
) -> torch.Tensor:
    context = _first_token_context(self.attention, hidden_states, attention_mask, ("q_lin", "k_lin", "v_lin"))
    attention_output = self.sa_layer_norm(self.attention.out_lin(context) + hidden_states[:, :1])
    return self.output_layer_norm(self.ffn(attention_output) + attention_output)


def _mpnet_first_token_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None, *args: object, **kwargs: object,
) -> tuple[torch.Tensor]:
    attention = self.attention.attn
    # the present heads' rows of the shared position bias join the padding mask, as in every layer
    mask = head_bias_mask(attention, attention_mask, position_bias)
    context = _first_token_context(attention, hidden_states, mask, ("q", "k", "v"))
    attention_output = self.attention.LayerNorm(attention.o(context) + hidden_states[:, :1])
    return (self.output(self.intermediate(attention_output), attention_output),)


# The last layer computing the first token only, per layer layout (``Family.layout``).
FIRST_TOKEN_FORWARDS = {
    "bert": _bert_first_token_forward,
    "distilbert": _distilbert_first_token_forward,
    "mpnet": _mpnet_first_token_forward,
}


def layer_inputs(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The hidden states entering each encoder layer, ``L`` tensors ``[B, T, D]`` (no grad)."""
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    return list(output.hidden_states[:-1])
