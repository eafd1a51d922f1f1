"""The one module that touches transformers internals.

Everything headprune does to attention goes through here: capturing attention probabilities
(and their gradients), replacing one layer's probabilities, gating each head's output, running the
encoder from a given layer on, and slicing heads out of the projections.

transformers 5 removed ``head_mask`` and ``prune_heads``; the supported extension point is the
attention interface. We register one implementation, ``"headprune"``, with both
``AttentionInterface`` and ``AttentionMaskInterface`` (without the latter, padding masks would be
silently dropped) and switch a model to it only while instrumenting, so an uninstrumented model
keeps its fastest backend (SDPA).

Head indices: a physically pruned layer keeps a subset of its original heads. Gates, captured
attentions and replacements speak in the layer's *current* heads; :func:`kept_heads` maps them back
to the original indices, which is what results (``HeadScores``, ``[B, L, H, T, T]``) use.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from attribution.core.errors import HeadpruneError

ATTN_IMPLEMENTATION = "headprune"


@dataclass(frozen=True)
class _Family:
    """Where a model family keeps the pieces we need, as attribute paths."""

    layers: str  # from the base model to the ModuleList of encoder layers
    attention: str  # from a layer to the module that calls the attention interface
    query: str
    key: str
    value: str
    output: str  # from a layer to the output projection (input columns = heads)
    output_inside_attention: bool  # DistilBERT applies out_lin inside the attention module


_BERT_LIKE = _Family(
    "encoder.layer", "attention.self", "query", "key", "value", "attention.output.dense", False
)
_FAMILIES: dict[str, _Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "distilbert": _Family(
        "transformer.layer", "attention", "q_lin", "k_lin", "v_lin", "attention.out_lin", True
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def _get(obj: object, path: str) -> nn.Module:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj  # type: ignore[return-value]


def model_family(model: nn.Module) -> _Family:
    """The family description of a supported model; one clear error for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        raise HeadpruneError(
            f"model type {model_type!r} is not supported; headprune supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} encoders"
        )
    return _FAMILIES[model_type]


def encoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The model's encoder layers, bottom to top."""
    family = model_family(model)
    return list(_get(model.base_model, family.layers))


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """Per layer, the module that calls the attention interface (the one we instrument)."""
    family = model_family(model)
    return [_get(layer, family.attention) for layer in encoder_layers(model)]


def output_projection(model: PreTrainedModel, layer: int) -> nn.Linear:
    """The ``nn.Linear`` mapping layer ``layer``'s concatenated head outputs ``[..., H_l * d_h]`` to
    the hidden size; its input columns ``[p * d_h, (p + 1) * d_h)`` belong to the p-th present head.

    For callers that rescale heads (fold gates into weights) or hook the per-head outputs.
    """
    family = model_family(model)
    return _get(encoder_layers(model)[layer], family.output)  # type: ignore[return-value]


def head_size(model: PreTrainedModel) -> int:
    """Width of one head (d_h)."""
    return attention_modules(model)[0].attention_head_size


def original_num_heads(model: PreTrainedModel) -> int:
    """Heads per layer before any pruning (H in ``[L, H]`` results)."""
    config = model.config
    return int(getattr(config, "num_attention_heads", None) or config.n_heads)


def kept_heads(model: PreTrainedModel) -> list[list[int]]:
    """Per layer, the original indices of the heads still present (all of them if never pruned)."""
    heads = original_num_heads(model)
    return [list(getattr(m, "headprune_kept_heads", range(heads))) for m in attention_modules(model)]


def heads_per_layer(model: PreTrainedModel) -> list[int]:
    """Per layer, how many heads it has now."""
    return [len(k) for k in kept_heads(model)]


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
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return previous


def _restore_attention(model: PreTrainedModel, previous: str | None) -> None:
    # A persistent head mask needs our implementation to stay on.
    wanted = ATTN_IMPLEMENTATION if _has_persistent_mask(model) else (previous or "sdpa")
    if wanted == ATTN_IMPLEMENTATION and model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    elif wanted != model.config._attn_implementation:
        model.set_attn_implementation(wanted)


def _headprune_attention(
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
        return _apply_gates(module, probe, layer, output).transpose(1, 2).contiguous(), None

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
    output = _apply_gates(module, probe, layer, context)
    return output.transpose(1, 2).contiguous(), probs


def _apply_gates(
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


AttentionInterface.register(ATTN_IMPLEMENTATION, _headprune_attention)
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
    if mask is None:
        mask = [None] * len(modules)
    if len(mask) != len(modules):
        raise HeadpruneError(f"head mask has {len(mask)} layers, the model has {len(modules)}")
    sizes = heads_per_layer(model)
    for layer, (module, gate) in enumerate(zip(modules, mask, strict=True)):
        if gate is not None:
            gate = torch.as_tensor(gate, dtype=torch.float32)
            if gate.shape != (sizes[layer],):
                raise HeadpruneError(
                    f"head mask of layer {layer} has shape {tuple(gate.shape)}, expected ({sizes[layer]},)"
                )
            gate = gate.to(next(model.parameters()).device)
        module.headprune_head_mask = gate
    if _has_persistent_mask(model):
        _use_headprune_attention(model)
    elif model.config._attn_implementation == ATTN_IMPLEMENTATION and not any(
        getattr(m, "_headprune_probe", None) for m in modules
    ):
        model.set_attn_implementation("sdpa")


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

    def skipped(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states

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
    value = _get(attention, family.value)(hidden_states)
    return value.view(bsz, seq, -1, attention.attention_head_size).transpose(1, 2)


def project_heads(model: PreTrainedModel, layer: int, context: torch.Tensor) -> torch.Tensor:
    """Head outputs ``context`` ``[B, H_l, T, d_h]`` (before gating) through the persistent gates and
    the output projection *without its bias*: ``[B, T, D]``. Linear in ``context``."""
    attention = attention_modules(model)[layer]
    bsz, _, seq, _ = context.shape
    gated = _apply_gates(attention, None, layer, context).transpose(1, 2).reshape(bsz, seq, -1)
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
    forward = _distilbert_first_token_forward if family.output_inside_attention else _bert_first_token_forward
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
    if "forward" in attention.__dict__:  # a layer pruned to zero heads
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
    context, _ = _headprune_attention(attention, q, k, v, attention_mask, scaling=attention.scaling, dropout=dropout)
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
    scores = torch.bmm(q_in_input_space, hidden_states.transpose(1, 2)) * attention.scaling  # [B, H, T]
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
    context = _apply_gates(attention, probe, layer, context)
    return context.transpose(1, 2).reshape(bsz, 1, -1)


def _bert_first_token_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
    *args: object, **kwargs: object,
) -> torch.Tensor:
    family = _BERT_LIKE
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


def layer_inputs(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The hidden states entering each encoder layer, ``L`` tensors ``[B, T, D]`` (no grad)."""
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
    return list(output.hidden_states[:-1])


# --------------------------------------------------------------------------------------------
# Physical head removal
# --------------------------------------------------------------------------------------------


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
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


def _set(obj: object, path: str, value: nn.Module) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        obj = getattr(obj, parent)
    setattr(obj, name, value)


def _empty_attention_forward(self: nn.Module, hidden_states: torch.Tensor, *args: object, **kwargs: object):
    # A layer with no heads left: the context is empty, so the output projection gives its bias.
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    inner_output = getattr(self, "_headprune_inner_output", None)
    return (getattr(self, inner_output)(context) if inner_output else context), None


def keep_heads_in_layer(model: PreTrainedModel, layer: int, keep: list[int]) -> None:
    """Keep only the heads ``keep`` (original indices, a subset of those present) of ``layer``.

    Slices the query/key/value output rows and the output projection's input columns. A layer
    left with no heads then contributes exactly its output projection's bias.
    """
    family = model_family(model)
    layer_module = encoder_layers(model)[layer]
    attention = _get(layer_module, family.attention)
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
        device=_get(attention, family.query).weight.device,
    )
    for name in (family.query, family.key, family.value):
        _set(attention, name, _slice_linear(_get(attention, name), index, dim=0))
    _set(layer_module, family.output, _slice_linear(_get(layer_module, family.output), index, dim=1))

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
        if family.output_inside_attention:
            attention._headprune_inner_output = family.output.rsplit(".", 1)[-1]
        attention.forward = types.MethodType(_empty_attention_forward, attention)


# --------------------------------------------------------------------------------------------
# Per-head projections (read-only; for token relevance and the disentangled-attention diagnostic)
# --------------------------------------------------------------------------------------------


@dataclass
class HeadProjections:
    """One layer's per-head projections of the hidden states entering it (current heads).

    ``query``/``key``/``value`` ``[B, H_l, T, d_h]`` (biases included; the logits are
    ``scaling * query @ key^T`` plus the padding mask); ``transformed`` ``[B, H_l, T, D]`` is each
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


def head_projections(model: PreTrainedModel, layer: int, hidden_states: torch.Tensor) -> HeadProjections:
    """Per-head Q/K/V and value-through-output-projection of ``layer`` for ``hidden_states`` ``[B, T, D]``.

    Valid for every supported family: they are all post-LayerNorm, so the attention module's
    input is the layer's input (``layer_inputs(model, batch)[layer]``). A layer with no heads
    left gives tensors with ``H_l = 0``.
    """
    family = model_family(model)
    layer_module = encoder_layers(model)[layer]
    attention = _get(layer_module, family.attention)
    d_h = attention.attention_head_size
    bsz, seq, _ = hidden_states.shape
    n_heads = len(kept_heads(model)[layer])

    def split(linear_path: str) -> torch.Tensor:
        out = _get(attention, linear_path)(hidden_states)  # [B, T, H_l * d_h]
        return out.view(bsz, seq, n_heads, d_h).transpose(1, 2)

    query, key, value = split(family.query), split(family.key), split(family.value)
    weight = _get(layer_module, family.output).weight  # [D, H_l * d_h]
    per_head = weight.view(weight.shape[0], n_heads, d_h).permute(1, 2, 0)  # [H_l, d_h, D]
    transformed = torch.einsum("bhtd,hde->bhte", value, per_head)
    scaling = float(getattr(attention, "scaling", d_h**-0.5))
    return HeadProjections(query, key, value, transformed, scaling)
