"""Capturing attention probabilities, replacing them, and gating heads, through transformers' attention
interface (``"headprune"``, registered with both the attention and the attention-mask interface).

Families that compute attention inline (MPNet; ``Family.interface`` is False) are routed to the same
``headprune_attention`` by :func:`inline_attention_forward`, installed on each attention module
while anything needs it (a probe, a persistent mask, removed heads) and removed afterwards, so an
uninstrumented dense model runs its own code.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attribution.core.errors import HeadpruneError
from attribution.instrument.families import (
    ATTN_IMPLEMENTATION,
    attention_modules,
    attention_scaling,
    checked_mask,
    head_bias_mask,
    heads_per_layer,
    inner_output,
    kept_heads,
    model_family,
    original_num_heads,
    submodule,
)

# --------------------------------------------------------------------------------------------
# The attention implementation
# --------------------------------------------------------------------------------------------


class AttentionProbe:
    """Instruments a model's self-attention for the duration of a ``with`` block.

    Settings can change between forward passes inside the block:

    - ``capture``: record each layer's attention probabilities ``[B, H_l, T, T]`` in
      ``attentions[layer]``; when they require grad, their ``.grad`` is retained after backward.
    - ``gates[layer]``: ``[H_l]`` or ``[B, H_l]`` multipliers of each head's output (differentiable;
      a zero gate removes the head exactly as physical pruning does).
    - ``replace[layer]``: a tensor ``[B, H_l, T, T]`` used instead of the layer's probabilities, or
      a callable ``probs -> probs``.
    - ``capture_context``: record each layer's head outputs before gating, ``A_h @ V_h``
      ``[B, H_l, T, d_h]``, in ``contexts[layer]``, as nodes of the autograd graph (made
      differentiable when nothing upstream is), so one backward pass gives dF/d(context) of every
      layer at once.
    - ``layers``: restrict capture to these layers (all by default).

    On exit, the model's previous attention implementation is restored, exceptions included.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        capture: bool = False,
        capture_context: bool = False,
        layers: list[int] | None = None,
    ) -> None:
        self.model = model
        self.capture = capture
        self.capture_context = capture_context
        self.layers = None if layers is None else set(layers)
        self.gates: dict[int, torch.Tensor] = {}
        self.replace: dict[int, torch.Tensor | Callable[[torch.Tensor], torch.Tensor]] = {}
        self.attentions: dict[int, torch.Tensor] = {}
        self.contexts: dict[int, torch.Tensor] = {}
        self._modules = attention_modules(model)
        self._previous: str | None = None

    def __enter__(self) -> AttentionProbe:
        for index, module in enumerate(self._modules):
            if getattr(module, "_headprune_probe", None) is not None:
                raise HeadpruneError("this model is already instrumented by another AttentionProbe")
            module._headprune_probe = (self, index)
        self._previous = _use_headprune_attention(self.model)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for module in self._modules:
            module._headprune_probe = None
        _restore_attention(self.model, self._previous)
        self.clear()

    def clear(self) -> None:
        """Forget captured attentions and contexts (call between forward passes to free memory)."""
        self.attentions = {}
        self.contexts = {}

    def _wants(self, layer: int) -> bool:
        return self.capture and (self.layers is None or layer in self.layers)

    def _record_context(self, layer: int, context: torch.Tensor) -> torch.Tensor:
        """Keep ``context`` when asked to; returns the tensor the forward pass must go on with."""
        if not self.capture_context or (self.layers is not None and layer not in self.layers):
            return context
        if torch.is_grad_enabled() and not context.requires_grad:
            context = context.detach().requires_grad_()  # nothing upstream needs grad: a leaf
        self.contexts[layer] = context
        return context


def _use_headprune_attention(model: PreTrainedModel) -> str:
    previous = model.config._attn_implementation
    if not model_family(model).interface:
        install_inline_attention(model)
    elif previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return previous


def _restore_attention(model: PreTrainedModel, previous: str | None) -> None:
    if not model_family(model).interface:
        _release_inline_attention(model)
        return
    # A persistent head mask needs our implementation to stay on.
    wanted = ATTN_IMPLEMENTATION if _has_persistent_mask(model) else (previous or "sdpa")
    if wanted == ATTN_IMPLEMENTATION and model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    elif wanted != model.config._attn_implementation:
        model.set_attn_implementation(wanted)


def headprune_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with hooks. query/key/value ``[B, H, T, d_h]`` -> (``[B, T, H, d_h]``, probs)."""
    probe, layer = getattr(module, "_headprune_probe", None) or (None, -1)
    replacement = probe.replace.get(layer) if probe is not None else None
    wants_probs = replacement is not None or (probe is not None and probe._wants(layer))

    if not wants_probs:
        # Nothing reads or changes this layer's probabilities: the fused kernel is exact and faster.
        output = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            dropout_p=dropout if module.training else 0.0, scale=scaling,
        )
        if probe is not None:
            output = probe._record_context(layer, output)
        return apply_gates(module, probe, layer, output).transpose(1, 2).contiguous(), None

    if isinstance(replacement, torch.Tensor):
        # fewer query rows than the replacement: first_token_last_layer, which keeps the first rows
        probs = replacement[..., : query.shape[-2], :] if replacement.shape[-2] != query.shape[-2] else replacement
    else:
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        if replacement is not None:
            probs = replacement(probs)

    if probe is not None and probe._wants(layer):
        if probs.requires_grad:
            probs.retain_grad()
        probe.attentions[layer] = probs

    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(dropped, value)
    if probe is not None:
        context = probe._record_context(layer, context)
    output = apply_gates(module, probe, layer, context)
    return output.transpose(1, 2).contiguous(), probs


def apply_gates(
    module: nn.Module, probe: AttentionProbe | None, layer: int, output: torch.Tensor
) -> torch.Tensor:
    """Multiply each head's output ``[B, H, T, d_h]`` by the persistent mask and the probe's gate."""
    gate = getattr(module, "headprune_head_mask", None)
    if probe is not None and layer in probe.gates:
        gate = probe.gates[layer] if gate is None else gate * probe.gates[layer]
    if gate is None:
        return output
    gate = gate.to(output.dtype)
    return output * (gate[:, :, None, None] if gate.dim() == 2 else gate[None, :, None, None])


def inline_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    output_attentions: bool = False,
    **kwargs: object,
) -> tuple[torch.Tensor, ...]:
    """The forward headprune installs on an inline-attention module (MPNet's ``MPNetSelfAttention``,
    same signature and outputs): ``hidden_states`` ``[B, T, D]`` -> ``(output [B, T, D],)`` (plus the
    probabilities when ``output_attentions``).

    Computes what the module computes (``softmax(q k^T / sqrt(d_h) + bias + mask) v`` through the
    output projection), with the present heads' rows of the shared position bias folded into the
    additive mask (:func:`head_bias_mask`), through :func:`headprune_attention`: probe, gates and
    persistent masks act exactly as for the other families, and SDPA runs when nothing reads the
    probabilities.
    """
    family = self._headprune_family
    bsz, seq, _ = hidden_states.shape
    d_h = self.attention_head_size
    query, key, value = (
        submodule(self, path)(hidden_states).view(bsz, seq, -1, d_h).transpose(1, 2)
        for path in (family.query, family.key, family.value)
    )
    mask = head_bias_mask(self, attention_mask, position_bias)
    context, probs = headprune_attention(
        self, query, key, value, mask, scaling=attention_scaling(self), dropout=self.dropout.p
    )
    output = submodule(self, self._headprune_inner_output)(context.reshape(bsz, seq, -1))
    return (output, probs) if output_attentions else (output,)


def _is_inline(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is inline_attention_forward


def install_inline_attention(model: PreTrainedModel) -> None:
    """Route a family that computes attention inline through :func:`inline_attention_forward`
    (idempotent; a no-op for families using the attention interface). Layers pruned to no heads
    keep their empty forward."""
    family = model_family(model)
    if family.interface:
        return
    inner = inner_output(family)
    for module in attention_modules(model):
        if "forward" in module.__dict__:  # ours already, or a layer with no heads left
            continue
        module._headprune_family = family
        module._headprune_inner_output = inner
        module.forward = types.MethodType(inline_attention_forward, module)


def _release_inline_attention(model: PreTrainedModel) -> None:
    """Give an inline-attention model its own forward back once nothing needs ours: no probe, no
    persistent head mask and no head removed (removed heads need the bias sliced in every pass)."""
    modules = attention_modules(model)
    if any(getattr(m, "_headprune_probe", None) is not None for m in modules) or _has_persistent_mask(model):
        return
    heads = original_num_heads(model)
    if any(len(kept) != heads for kept in kept_heads(model)):
        return
    for module in modules:
        if _is_inline(module):
            del module.forward


AttentionInterface.register(ATTN_IMPLEMENTATION, headprune_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


# --------------------------------------------------------------------------------------------
# Persistent head masks
# --------------------------------------------------------------------------------------------


def _has_persistent_mask(model: PreTrainedModel) -> bool:
    return any(getattr(m, "headprune_head_mask", None) is not None for m in attention_modules(model))


def get_head_mask(model: PreTrainedModel) -> list[torch.Tensor | None]:
    """Per layer, the persistent gate ``[H_l]`` or None."""
    return [getattr(m, "headprune_head_mask", None) for m in attention_modules(model)]


def set_head_mask(model: PreTrainedModel, mask: list[torch.Tensor | None] | None) -> None:
    """Set (or with None clear) persistent per-layer head gates ``[H_l]`` (current heads).

    While any gate is set the model runs on headprune's eager implementation; clearing every gate
    returns it to SDPA.
    """
    modules = attention_modules(model)
    device = next(model.parameters()).device
    for module, gate in zip(modules, checked_mask(mask, heads_per_layer(model), "head", device), strict=True):
        module.headprune_head_mask = gate
    if _has_persistent_mask(model):
        _use_headprune_attention(model)
    elif not model_family(model).interface:
        _release_inline_attention(model)
    elif model.config._attn_implementation == ATTN_IMPLEMENTATION and not any(
        getattr(m, "_headprune_probe", None) for m in modules
    ):
        model.set_attn_implementation("sdpa")
