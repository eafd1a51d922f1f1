"""Where each model family keeps its attention and feed-forward pieces: a table of attribute paths, not
branches."""

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
