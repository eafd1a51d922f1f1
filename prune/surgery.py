"""Physical head removal: the model really gets smaller and faster.

``remove_heads`` slices the query/key/value rows and the output projection's input columns of
each layer (through ``attribution.instrument.keep_heads_in_layer``). Indices always name the
**original** heads, so removals compose; the config records the heads that remain under
``headprune_kept_heads`` (``KEPT_HEADS_KEY``). ``bake_mask`` turns a persistent head mask into
weights. Saving and loading pruned checkpoints: ``prune.checkpoints`` (``save_pruned``,
``load_model``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.masking import HeadSet, head_gates, model_heads

KEPT_HEADS_KEY = "headprune_kept_heads"


def _check_not_empty(kept: Sequence[Sequence[int]]) -> None:
    if not any(kept):
        raise HeadpruneError("refusing to remove every attention head of the model (at least one must remain)")


def remove_heads(model: PreTrainedModel, heads: HeadSet) -> dict[int, list[int]]:
    """Physically remove ``heads`` (original indices) from ``model``, in place.

    A layer may lose all its heads: its attention block then contributes exactly the output
    projection's bias, as a fully masked layer does. Heads that were already removed are ignored
    (so repeated removals compose); removing every head of the model raises ``HeadpruneError``.
    Persistent gates of the remaining heads are kept. Returns the heads removed by this call.
    """
    chosen = model_heads(model, heads)
    kept = instrument.kept_heads(model)
    new_kept = [[h for h in present if h not in chosen.get(layer, [])] for layer, present in enumerate(kept)]
    _check_not_empty(new_kept)
    removed: dict[int, list[int]] = {}
    for layer, (present, keep) in enumerate(zip(kept, new_kept, strict=True)):
        if keep != present:
            instrument.keep_heads_in_layer(model, layer, keep)
            removed[layer] = [h for h in present if h not in keep]
    setattr(model.config, KEPT_HEADS_KEY, instrument.kept_heads(model))
    return removed


def fold_head_scales(model: PreTrainedModel, layer: int, scales: torch.Tensor | Sequence[float]) -> None:
    """Multiply each present head's output in ``layer`` by ``scales[p]`` (``[H_l]``, current order) by
    scaling its columns of the output projection. Exact: the projection is linear in each head's
    output and its bias is untouched."""
    scales = torch.as_tensor(scales, dtype=torch.float64).flatten()
    sizes = instrument.heads_per_layer(model)
    if scales.numel() != sizes[layer]:
        raise HeadpruneError(f"layer {layer} has {sizes[layer]} heads but {scales.numel()} scales were given")
    if sizes[layer] == 0:
        return
    projection = instrument.output_projection(model, layer)
    d_h = instrument.head_size(model)
    column_scales = scales.repeat_interleave(d_h).to(projection.weight.dtype).to(projection.weight.device)
    with torch.no_grad():
        projection.weight.mul_(column_scales[None, :])


def bake_mask(model: PreTrainedModel) -> dict[int, list[int]]:
    """Turn the persistent head mask into weights: heads gated to 0 are removed, other non-unit
    gates (e.g. repair scales) are folded into the output projection, and the mask is cleared.

    The model computes the same function before and after, now on its fastest backend.
    Returns the heads removed.
    """
    gates = head_gates(model)
    kept = instrument.kept_heads(model)
    zero = {layer: [kept[layer][p] for p in range(len(g)) if g[p] == 0] for layer, g in enumerate(gates)}
    _check_not_empty([[h for h in present if h not in zero[layer]] for layer, present in enumerate(kept)])
    instrument.set_head_mask(model, None)
    for layer, gate in enumerate(gates):
        if bool((gate != 1).any()):
            fold_head_scales(model, layer, torch.where(gate == 0, torch.ones_like(gate), gate))
    return remove_heads(model, {layer: heads for layer, heads in zero.items() if heads}) if any(zero.values()) else {}
