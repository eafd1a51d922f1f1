"""Physically slicing heads out of a layer's projections (a layer may keep none)."""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError
from attribution.instrument.families import (
    attention_scaling,
    encoder_layers,
    inner_output,
    kept_heads,
    model_family,
    position_bias,
    submodule,
)
from attribution.instrument.probe import install_inline_attention

# --------------------------------------------------------------------------------------------
# Physical head removal
# --------------------------------------------------------------------------------------------


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``index`` along ``dim`` (0: output rows, 1: input columns)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = None
    if linear.bias is not None:
        bias = linear.bias.detach().clone() if dim == 1 else linear.bias.detach()[index].clone()
    out_features, in_features = weight.shape
    with warnings.catch_warnings():  # initialising a zero-width Linear warns; we overwrite it anyway
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(
            in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def set_submodule(obj: object, path: str, value: nn.Module) -> None:
    """Replace the module at the dotted ``path`` below ``obj``."""
    *parents, name = path.split(".")
    for parent in parents:
        obj = getattr(obj, parent)
    setattr(obj, name, value)


def _empty_attention_forward(self: nn.Module, hidden_states: torch.Tensor, *args: object, **kwargs: object):
    # A layer with no heads left: the context is empty, so the output projection gives its bias.
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    inner = getattr(self, "_headprune_inner_output", None)
    return (submodule(self, inner)(context) if inner else context), None


def keep_heads_in_layer(model: PreTrainedModel, layer: int, keep: list[int]) -> None:
    """Keep only the heads ``keep`` (original indices, a subset of those present) of ``layer``.

    Slices the query/key/value output rows and the output projection's input columns. A layer
    left with no heads then contributes exactly its output projection's bias. A family with a shared
    position bias (MPNet) keeps the bias module whole: the layer's forward (installed here) adds the
    bias rows of the heads it keeps.
    """
    family = model_family(model)
    layer_module = encoder_layers(model)[layer]
    attention = submodule(layer_module, family.attention)
    present = kept_heads(model)[layer]
    if sorted(set(keep)) != sorted(keep) or not set(keep) <= set(present):
        raise HeadpruneError(f"layer {layer}: heads {sorted(keep)} are not a subset of the present {present}")
    keep = sorted(keep)
    if keep == present:
        return
    d_h = attention.attention_head_size
    positions = [present.index(h) for h in keep]
    index = torch.tensor(
        [p * d_h + i for p in positions for i in range(d_h)], dtype=torch.long,
        device=submodule(attention, family.query).weight.device,
    )
    for name in (family.query, family.key, family.value):
        set_submodule(attention, name, slice_linear(submodule(attention, name), index, dim=0))
    set_submodule(layer_module, family.output, slice_linear(submodule(layer_module, family.output), index, dim=1))

    # Keep the bookkeeping attributes truthful (forward itself reshapes with -1 heads).
    for count_attr in ("num_attention_heads", "n_heads"):
        if hasattr(attention, count_attr):
            setattr(attention, count_attr, len(keep))
    for size_attr in ("all_head_size",):
        if hasattr(attention, size_attr):
            setattr(attention, size_attr, len(keep) * d_h)
    attention.headprune_kept_heads = keep
    mask = getattr(attention, "headprune_head_mask", None)
    if mask is not None:
        attention.headprune_head_mask = mask[positions] if keep else None
    if not keep:
        attention._headprune_inner_output = inner_output(family)
        attention.forward = types.MethodType(_empty_attention_forward, attention)
    install_inline_attention(model)


# --------------------------------------------------------------------------------------------
# Per-head projections (read-only; for token relevance and the disentangled-attention diagnostic)
# --------------------------------------------------------------------------------------------


@dataclass
class HeadProjections:
    """One layer's per-head projections of the hidden states entering it (current heads).

    ``query``/``key``/``value`` ``[B, H_l, T, d_h]`` (biases included; the logits are
    ``scaling * query @ key^T`` plus ``position_bias`` and the padding mask); ``position_bias``
    ``[B, H_l, T, T]`` is the layer's share of a family's relative position bias (MPNet), None for
    families without one; ``transformed`` ``[B, H_l, T, D]`` is each
    token's value through head h's slice of the output projection (bias excluded): the vector head
    h writes into token i's attention output per unit of attention ``A[h, i, j]`` on token j, so
    ``sum_h A_h @ transformed_h + output bias`` is the attention block's output before residual
    and LayerNorm.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    transformed: torch.Tensor
    scaling: float
    position_bias: torch.Tensor | None = None


def head_projections(model: PreTrainedModel, layer: int, hidden_states: torch.Tensor) -> HeadProjections:
    """Per-head Q/K/V and value-through-output-projection of ``layer`` for ``hidden_states`` ``[B, T, D]``.

    Valid for every supported family: they are all post-LayerNorm, so the attention module's
    input is the layer's input (``layer_inputs(model, batch)[layer]``). A layer with no heads
    left gives tensors with ``H_l = 0``.
    """
    family = model_family(model)
    layer_module = encoder_layers(model)[layer]
    attention = submodule(layer_module, family.attention)
    d_h = attention.attention_head_size
    bsz, seq, _ = hidden_states.shape
    n_heads = len(kept_heads(model)[layer])

    def split(linear_path: str) -> torch.Tensor:
        out = submodule(attention, linear_path)(hidden_states)  # [B, T, H_l * d_h]
        return out.view(bsz, seq, n_heads, d_h).transpose(1, 2)

    query, key, value = split(family.query), split(family.key), split(family.value)
    weight = submodule(layer_module, family.output).weight  # [D, H_l * d_h]
    per_head = weight.view(weight.shape[0], n_heads, d_h).permute(1, 2, 0)  # [H_l, d_h, D]
    transformed = torch.einsum("bhtd,hde->bhte", value, per_head)
    bias = position_bias(model, hidden_states)
    if bias is not None:
        bias = bias[:, kept_heads(model)[layer]]
    return HeadProjections(query, key, value, transformed, attention_scaling(attention), bias)
