"""Physical head removal: the model really gets smaller and faster.

``remove_heads`` slices the query/key/value rows and the output projection's input columns of
each layer (through ``attribution.instrument.keep_heads_in_layer``). Indices always name the
**original** heads, so removals compose; the config records the heads that remain under
``headprune_kept_heads`` (``KEPT_HEADS_KEY``). ``remove_neurons`` does the same for feed-forward
neurons (intermediate rows, output columns; a layer may keep none) and records the neurons that
remain under ``headprune_kept_neurons`` (``KEPT_NEURONS_KEY``). ``bake_mask`` turns persistent head
and neuron masks into weights. Saving and loading pruned checkpoints: ``prune.checkpoints``
(``save_pruned``, ``load_model``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from prune.masking import HeadSet, NeuronSet, head_gates, model_heads, model_neurons, neuron_gates

KEPT_HEADS_KEY = "headprune_kept_heads"
KEPT_NEURONS_KEY = "headprune_kept_neurons"


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
    """Turn the persistent head and neuron masks into weights: heads and neurons gated to 0 are
    removed, other non-unit gates (e.g. repair scales) are folded into the output projection of
    their block, and the masks are cleared.

    The model computes the same function before and after, now on its fastest backend.
    Returns the heads removed (the neurons removed are in the config's ``KEPT_NEURONS_KEY``).
    """
    gates = head_gates(model)
    kept = instrument.kept_heads(model)
    zero = {layer: [kept[layer][p] for p in range(len(g)) if g[p] == 0] for layer, g in enumerate(gates)}
    _check_not_empty([[h for h in present if h not in zero[layer]] for layer, present in enumerate(kept)])
    _bake_neuron_mask(model)
    instrument.set_head_mask(model, None)
    for layer, gate in enumerate(gates):
        if bool((gate != 1).any()):
            fold_head_scales(model, layer, torch.where(gate == 0, torch.ones_like(gate), gate))
    return remove_heads(model, {layer: heads for layer, heads in zero.items() if heads}) if any(zero.values()) else {}


# --------------------------------------------------------------------------------------------
# Feed-forward neurons
# --------------------------------------------------------------------------------------------


def remove_neurons(model: PreTrainedModel, neurons: NeuronSet) -> dict[int, list[int]]:
    """Physically remove feed-forward ``neurons`` (``{layer: [neuron, ...]}``, original indices
    ``0..F-1``) from ``model``, in place: the intermediate linear's rows and the output linear's
    columns are sliced away.

    Any subset may go, a whole layer's neurons included: that block then adds exactly its output
    bias, as a fully masked one does. Neurons already removed are ignored (removals compose);
    persistent gates of the remaining neurons are kept. The config records the neurons that remain
    under ``KEPT_NEURONS_KEY``. Returns the neurons removed by this call.
    """
    chosen = model_neurons(model, neurons)
    kept = instrument.kept_neurons(model)
    removed: dict[int, list[int]] = {}
    for layer, drop in chosen.items():
        gone = set(drop) & set(kept[layer])
        if gone:
            instrument.keep_neurons_in_layer(model, layer, [n for n in kept[layer] if n not in gone])
            removed[layer] = sorted(gone)
    setattr(model.config, KEPT_NEURONS_KEY, instrument.kept_neurons(model))
    return removed


def fold_neuron_scales(model: PreTrainedModel, layer: int, scales: torch.Tensor | Sequence[float]) -> None:
    """Multiply each present neuron's activation in ``layer`` by ``scales[p]`` (``[F_l]``, current
    order) by scaling its column of the feed-forward output linear. Exact: that linear is linear in
    each neuron's activation and its bias is untouched."""
    scales = torch.as_tensor(scales, dtype=torch.float64).flatten()
    sizes = instrument.neurons_per_layer(model)
    if scales.numel() != sizes[layer]:
        raise HeadpruneError(f"layer {layer} has {sizes[layer]} neurons but {scales.numel()} scales were given")
    linear = instrument.ffn_output_projection(model, layer)
    with torch.no_grad():
        linear.weight.mul_(scales.to(linear.weight.dtype).to(linear.weight.device)[None, :])


def _bake_neuron_mask(model: PreTrainedModel) -> dict[int, list[int]]:
    """The neuron half of :func:`bake_mask`; returns the neurons removed."""
    if all(gate is None for gate in instrument.get_neuron_mask(model)):
        return {}
    gates = neuron_gates(model)
    kept = instrument.kept_neurons(model)
    instrument.set_neuron_mask(model, None)
    zero: dict[int, list[int]] = {}
    for layer, gate in enumerate(gates):
        if bool((gate != 1).any()):
            fold_neuron_scales(model, layer, torch.where(gate == 0, torch.ones_like(gate), gate))
        off = torch.nonzero(gate == 0).flatten().tolist()
        if off:
            zero[layer] = [kept[layer][p] for p in off]
    return remove_neurons(model, zero) if zero else {}
