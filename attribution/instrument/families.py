"""Where each model family keeps its attention and feed-forward pieces: a table of attribute paths, not
branches.

Two families compute attention differently, and the table says how rather than code testing model
types:

- ``interface``: BERT-like models and DistilBERT call transformers' attention interface, so
  instrumenting them means switching ``config._attn_implementation`` to ``"headprune"``. MPNet
  computes attention inline (transformers 5 cannot switch it), so headprune installs its own
  forward on each attention module instead (``probe.inline_attention_forward``), built from the same
  paths (query/key/value/output) and ending in the same ``headprune_attention``.
- ``position_bias``: MPNet adds a relative position bias ``[B, H, T, T]`` to every layer's logits,
  computed once per forward from one embedding shared by all layers (so it cannot be sliced at the
  weights). headprune treats it as a per-head part of the additive attention mask: each layer adds
  the bias rows of the heads it still has (original indices, ``kept_heads``), so a pruned layer
  sees exactly the bias its remaining heads saw before, and every consumer of the mask (SDPA, the
  eager path, AttAttr's first-token path) handles it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from attribution.core.errors import HeadpruneError

ATTN_IMPLEMENTATION = "headprune"


@dataclass(frozen=True)
class Family:
    """Where a model family keeps the pieces we need, as attribute paths."""

    layers: str  # from the base model to the ModuleList of encoder layers
    attention: str  # from a layer to the module that calls the attention interface
    query: str
    key: str
    value: str
    output: str  # from a layer to the output projection (input columns = heads)
    output_inside_attention: bool  # DistilBERT applies out_lin inside the attention module
    # The feed-forward block, from a layer: the intermediate linear (output rows = neurons), the
    # activation module whose output neuron gates multiply, and the output linear (input columns =
    # neurons). ``intermediate_size`` names the config attribute holding the original width F.
    intermediate: str
    activation: str
    ffn_output: str
    intermediate_size: str
    # The LayerNorms each sub-layer's output projection feeds, from a layer: their input is the
    # projection's output plus the sub-layer's residual (all supported families are post-LN).
    output_norm: str = "attention.output.LayerNorm"
    ffn_output_norm: str = "output.LayerNorm"
    # How a layer is laid out around its attention (the first-token fast path rebuilds a layer's
    # forward): "bert" (self + output.dense/LayerNorm), "distilbert" (out_lin inside attention,
    # sa_layer_norm) or "mpnet" (o inside attention, attention.LayerNorm).
    layout: str = "bert"
    # True: attention goes through transformers' attention interface; False: computed inline, and
    # headprune installs its own forward on the attention module (see the module docstring).
    interface: bool = True
    # Path from the base model to the module whose ``compute_position_bias(hidden_states)`` gives the
    # per-head logit bias ``[B, H, T, T]`` shared by all layers (passed to each layer's attention as
    # its third argument); None: no such bias.
    position_bias: str | None = None
    # An encoder layer returns a tuple (hidden states first) rather than the hidden states.
    layer_returns_tuple: bool = False


BERT_LIKE = Family(
    "encoder.layer", "attention.self", "query", "key", "value", "attention.output.dense", False,
    intermediate="intermediate.dense", activation="intermediate.intermediate_act_fn", ffn_output="output.dense",
    intermediate_size="intermediate_size",
)
FAMILIES: dict[str, Family] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "camembert": BERT_LIKE,
    "distilbert": Family(
        "transformer.layer", "attention", "q_lin", "k_lin", "v_lin", "attention.out_lin", True,
        intermediate="ffn.lin1", activation="ffn.activation", ffn_output="ffn.lin2", intermediate_size="hidden_dim",
        output_norm="sa_layer_norm", ffn_output_norm="output_layer_norm", layout="distilbert",
    ),
    "mpnet": Family(
        "encoder.layer", "attention.attn", "q", "k", "v", "attention.attn.o", True,
        intermediate="intermediate.dense", activation="intermediate.intermediate_act_fn", ffn_output="output.dense",
        intermediate_size="intermediate_size", output_norm="attention.LayerNorm",
        layout="mpnet", interface=False, position_bias="encoder", layer_returns_tuple=True,
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def submodule(obj: object, path: str) -> nn.Module:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj  # type: ignore[return-value]


def model_family(model: nn.Module) -> Family:
    """The family description of a supported model; one clear error for anything else."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise HeadpruneError(
            f"model type {model_type!r} is not supported; headprune supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} encoders"
        )
    return FAMILIES[model_type]


def inner_output(family: Family) -> str | None:
    """The output projection's path from the attention module when it lives inside it (DistilBERT,
    MPNet), else None."""
    prefix = family.attention + "."
    if family.output_inside_attention and family.output.startswith(prefix):
        return family.output[len(prefix):]
    return None


def attention_scaling(attention: nn.Module) -> float:
    """The factor on ``q . k`` of an attention module: its ``scaling`` or ``d_h ** -0.5`` (MPNet)."""
    return float(getattr(attention, "scaling", attention.attention_head_size**-0.5))


def head_bias_mask(
    attention: nn.Module, attention_mask: torch.Tensor | None, position_bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The additive mask of one layer: the padding mask ``[B, 1, T, T]`` (float, or bool = keep) plus
    the rows of the shared ``position_bias`` ``[B, H, T, T]`` belonging to the heads the layer still
    has; ``[B, H_l, T, T]`` float, or the padding mask as is when there is no bias."""
    if position_bias is None:
        return attention_mask
    kept = getattr(attention, "headprune_kept_heads", None)
    if kept is not None:
        position_bias = position_bias[:, kept]
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, torch.finfo(position_bias.dtype).min)
    return position_bias + attention_mask


def position_bias(model: PreTrainedModel, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The per-head logit bias ``[B, H, T, T]`` (original heads) the encoder adds in every layer for
    inputs of ``hidden_states``' shape ``[B, T, D]``; None for families without one."""
    family = model_family(model)
    if family.position_bias is None:
        return None
    return submodule(model.base_model, family.position_bias).compute_position_bias(hidden_states)


def encoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The model's encoder layers, bottom to top."""
    family = model_family(model)
    return list(submodule(model.base_model, family.layers))


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """Per layer, the module that calls the attention interface (the one we instrument)."""
    family = model_family(model)
    return [submodule(layer, family.attention) for layer in encoder_layers(model)]


def output_projection(model: PreTrainedModel, layer: int) -> nn.Linear:
    """The ``nn.Linear`` mapping layer ``layer``'s concatenated head outputs ``[..., H_l * d_h]`` to
    the hidden size; its input columns ``[p * d_h, (p + 1) * d_h)`` belong to the p-th present head.

    For callers that rescale heads (fold gates into weights) or hook the per-head outputs.
    """
    family = model_family(model)
    return submodule(encoder_layers(model)[layer], family.output)  # type: ignore[return-value]


def sublayer_norm(model: PreTrainedModel, layer: int, kind: str) -> nn.Module:
    """The LayerNorm after layer ``layer``'s attention (``kind="attention"``) or feed-forward
    (``kind="ffn"``) sub-layer; its input ``[B, T, D]`` is the output projection's output plus the
    sub-layer's residual."""
    family = model_family(model)
    if kind not in ("attention", "ffn"):
        raise HeadpruneError(f"sub-layer kind must be attention or ffn, got {kind!r}")
    path = family.output_norm if kind == "attention" else family.ffn_output_norm
    return submodule(encoder_layers(model)[layer], path)


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


def checked_mask(
    mask: list[torch.Tensor | None] | None, sizes: list[int], unit: str, device: torch.device
) -> list[torch.Tensor | None]:
    """Per-layer gates ``[U_l]`` (or None) checked against the layers' current widths ``sizes`` and
    moved to ``device`` as float32; ``mask=None`` clears every layer. One-line errors name the unit."""
    if mask is None:
        return [None] * len(sizes)
    if len(mask) != len(sizes):
        raise HeadpruneError(f"{unit} mask has {len(mask)} layers, the model has {len(sizes)}")
    checked: list[torch.Tensor | None] = []
    for layer, gate in enumerate(mask):
        if gate is not None:
            gate = torch.as_tensor(gate, dtype=torch.float32)
            if gate.shape != (sizes[layer],):
                raise HeadpruneError(
                    f"{unit} mask of layer {layer} has shape {tuple(gate.shape)}, expected ({sizes[layer]},)"
                )
            gate = gate.to(device)
        checked.append(gate)
    return checked
