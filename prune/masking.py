"""Soft head masking: switch heads off with gates, without touching the weights.

A *head set* names heads by their **original** indices, as ``{layer: [head, ...]}`` or as an
iterable of ``(layer, head)`` pairs. Masking goes through the persistent gates of
``attribution.instrument`` (``set_head_mask``), so a masked model computes exactly what the
physically pruned model (``prune.surgery.remove_heads``) computes, only without the speed-up.

``mask_heads(model, heads)`` applies the mask at once and returns a handle; use it as a context
manager to restore the model exactly on exit (previous gates and attention implementation), or
keep the mask (persistent setting) and later call ``unmask_heads``.

Feed-forward neurons work the same way: ``mask_neurons(model, {layer: [neuron, ...]})`` (original
indices ``0..F-1``) gates them to 0 through ``attribution.instrument.set_neuron_mask``, exactly what
``prune.surgery.remove_neurons`` computes; ``unmask_neurons`` clears every neuron gate. Unlike heads,
masking every neuron of a layer (or of the model) is allowed: the block then adds its output bias.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError

HeadSet = Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise HeadpruneError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise HeadpruneError(f"{what} must be an integer, got {value!r}") from None


def normalize_heads(heads: HeadSet, num_layers: int, num_heads: int) -> dict[int, list[int]]:
    """``{layer: sorted unique heads}`` (only non-empty layers), checked against an ``L x H`` model.

    Accepts ``{layer: [head, ...]}`` or ``[(layer, head), ...]``; JSON-style string keys are
    accepted too. Out-of-range layers or heads raise a one-line ``HeadpruneError``.
    """
    if heads is None:
        raise HeadpruneError("no heads given")
    pairs: list[tuple[Any, Any]] = []
    if isinstance(heads, Mapping):
        for layer, layer_heads in heads.items():
            if isinstance(layer_heads, (str, bytes)) or not isinstance(layer_heads, Iterable):
                raise HeadpruneError(f"heads of layer {layer!r} must be a list of head indices, got {layer_heads!r}")
            if isinstance(layer, str) and layer.strip().lstrip("-").isdigit():
                layer = int(layer)
            pairs.extend((layer, head) for head in layer_heads)
    else:
        try:
            items = list(heads)
        except TypeError:
            raise HeadpruneError(
                f"heads must be {{layer: [head, ...]}} or [(layer, head), ...], got {heads!r}"
            ) from None
        for item in items:
            if isinstance(item, (str, bytes)) or not isinstance(item, Iterable) or len(tuple(item)) != 2:
                raise HeadpruneError(f"heads must be (layer, head) pairs, got {item!r}")
            pairs.append(tuple(item))  # type: ignore[arg-type]
    out: dict[int, set[int]] = {}
    for raw_layer, raw_head in pairs:
        layer = _as_index(raw_layer, "a layer index")
        head = _as_index(raw_head, "a head index")
        if not 0 <= layer < num_layers:
            raise HeadpruneError(f"unknown layer {layer}: the model has layers 0..{num_layers - 1}")
        if not 0 <= head < num_heads:
            raise HeadpruneError(f"unknown head {head} in layer {layer}: the model has heads 0..{num_heads - 1}")
        out.setdefault(layer, set()).add(head)
    return {layer: sorted(out[layer]) for layer in sorted(out)}


def model_heads(model: PreTrainedModel, heads: HeadSet) -> dict[int, list[int]]:
    """``normalize_heads`` against ``model``'s original shape."""
    return normalize_heads(heads, len(instrument.encoder_layers(model)), instrument.original_num_heads(model))


def count_heads(heads: Mapping[int, Iterable[int]]) -> int:
    """Number of heads in a normalised head set."""
    return sum(len(list(h)) for h in heads.values())


def head_gates(model: PreTrainedModel) -> list[torch.Tensor]:
    """Per layer, the current gates ``[H_l]`` (ones where no mask is set), as float32 copies."""
    return [
        torch.ones(n) if gate is None else gate.detach().float().cpu().clone()
        for n, gate in zip(instrument.heads_per_layer(model), instrument.get_head_mask(model), strict=True)
    ]


def masked_heads(model: PreTrainedModel) -> dict[int, list[int]]:
    """Heads whose gate is exactly 0, by original index (physically removed heads are not listed)."""
    out: dict[int, list[int]] = {}
    for layer, (kept, gate) in enumerate(zip(instrument.kept_heads(model), head_gates(model), strict=True)):
        zero = [kept[p] for p in range(len(kept)) if gate[p] == 0]
        if zero:
            out[layer] = zero
    return out


def active_heads(model: PreTrainedModel) -> list[list[int]]:
    """Per layer, original indices of heads that are present and not masked to 0."""
    masked = masked_heads(model)
    kept = instrument.kept_heads(model)
    return [[h for h in heads if h not in masked.get(layer, [])] for layer, heads in enumerate(kept)]


def unmask_heads(model: PreTrainedModel) -> None:
    """Clear every persistent gate (the model returns to its fastest attention backend)."""
    instrument.set_head_mask(model, None)


class HeadMask:
    """Handle returned by :func:`mask_heads`; a context manager that undoes the mask on exit."""

    def __init__(self, model: PreTrainedModel, heads: dict[int, list[int]]) -> None:
        self.model = model
        self.heads = heads
        self._previous_gates = [None if g is None else g.clone() for g in instrument.get_head_mask(model)]
        self._previous_kept = instrument.kept_heads(model)
        self._previous_impl = model.config._attn_implementation
        self._active = True

    def restore(self) -> None:
        """Put back the gates and attention implementation the model had before ``mask_heads``."""
        if not self._active:
            return
        self._active = False
        if instrument.kept_heads(self.model) != self._previous_kept:
            raise HeadpruneError("cannot restore a head mask after heads were physically removed")
        instrument.set_head_mask(self.model, self._previous_gates)
        if self.model.config._attn_implementation != self._previous_impl:
            self.model.set_attn_implementation(self._previous_impl)

    def __enter__(self) -> HeadMask:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def mask_heads(model: PreTrainedModel, heads: HeadSet, *, allow_empty_model: bool = False) -> HeadMask:
    """Gate the given heads (original indices) to 0, on top of any mask already set.

    Other heads keep their current gate (1, or a repair scale). Applied immediately; the returned
    handle restores the previous state when used as a context manager (or via ``restore()``)::

        with mask_heads(model, {0: [1, 3], 2: [0]}):
            logits = model(**batch).logits   # heads masked
        # model exactly as before

    Heads already removed physically cannot be masked (one-line error). Masking every head of the
    model is refused unless ``allow_empty_model``.
    """
    chosen = model_heads(model, heads)
    kept = instrument.kept_heads(model)
    for layer, layer_heads in chosen.items():
        absent = [h for h in layer_heads if h not in kept[layer]]
        if absent:
            raise HeadpruneError(f"layer {layer}: head(s) {absent} were already removed from the model")
    gates = head_gates(model)
    for layer, layer_heads in chosen.items():
        for head in layer_heads:
            gates[layer][kept[layer].index(head)] = 0.0
    if not allow_empty_model and all(bool((g == 0).all()) for g in gates):
        raise HeadpruneError("refusing to mask every attention head of the model (at least one must remain)")
    handle = HeadMask(model, chosen)
    current = instrument.get_head_mask(model)
    new = [
        None if cur is None and not chosen.get(layer) else gate
        for layer, (cur, gate) in enumerate(zip(current, gates, strict=True))
    ]
    instrument.set_head_mask(model, new)
    return handle


def set_head_scales(model: PreTrainedModel, scales: list[torch.Tensor | None]) -> None:
    """Set per-layer gates ``[H_l]`` (current heads) directly, e.g. repair scales; None = no gate."""
    instrument.set_head_mask(model, scales)


# --------------------------------------------------------------------------------------------
# Feed-forward neurons
# --------------------------------------------------------------------------------------------

NeuronSet = Mapping[int, Iterable[int]]


def model_neurons(model: PreTrainedModel, neurons: NeuronSet) -> dict[int, list[int]]:
    """``{layer: sorted unique neurons}`` (only non-empty layers), checked against the model's
    original shape (``L`` layers of ``F`` neurons); JSON-style string keys are accepted."""
    if not isinstance(neurons, Mapping):
        raise HeadpruneError(f"neurons must be {{layer: [neuron, ...]}}, got {type(neurons).__name__}")
    num_layers = len(instrument.encoder_layers(model))
    width = instrument.original_intermediate_size(model)
    out: dict[int, set[int]] = {}
    for raw_layer, layer_neurons in neurons.items():
        if isinstance(raw_layer, str) and raw_layer.strip().lstrip("-").isdigit():
            raw_layer = int(raw_layer)
        layer = _as_index(raw_layer, "a layer index")
        if not 0 <= layer < num_layers:
            raise HeadpruneError(f"unknown layer {layer}: the model has layers 0..{num_layers - 1}")
        if isinstance(layer_neurons, (str, bytes)) or not isinstance(layer_neurons, Iterable):
            raise HeadpruneError(f"neurons of layer {layer} must be a list of neuron indices, got {layer_neurons!r}")
        for raw in layer_neurons:
            neuron = _as_index(raw, "a neuron index")
            if not 0 <= neuron < width:
                raise HeadpruneError(f"unknown neuron {neuron} in layer {layer}: the model has neurons 0..{width - 1}")
            out.setdefault(layer, set()).add(neuron)
    return {layer: sorted(out[layer]) for layer in sorted(out)}


def neuron_gates(model: PreTrainedModel) -> list[torch.Tensor]:
    """Per layer, the current neuron gates ``[F_l]`` (ones where no mask is set), as float32 copies."""
    return [
        torch.ones(n) if gate is None else gate.detach().float().cpu().clone()
        for n, gate in zip(instrument.neurons_per_layer(model), instrument.get_neuron_mask(model), strict=True)
    ]


def masked_neurons(model: PreTrainedModel) -> dict[int, list[int]]:
    """Neurons whose gate is exactly 0, by original index (physically removed ones are not listed)."""
    out: dict[int, list[int]] = {}
    for layer, (kept, gate) in enumerate(zip(instrument.kept_neurons(model), neuron_gates(model), strict=True)):
        zero = [kept[p] for p in torch.nonzero(gate == 0).flatten().tolist()]
        if zero:
            out[layer] = zero
    return out


def unmask_neurons(model: PreTrainedModel) -> None:
    """Clear every persistent neuron gate."""
    instrument.set_neuron_mask(model, None)


class NeuronMask:
    """Handle returned by :func:`mask_neurons`; a context manager that undoes the mask on exit."""

    def __init__(self, model: PreTrainedModel, neurons: dict[int, list[int]]) -> None:
        self.model = model
        self.neurons = neurons
        self._previous_gates = [None if g is None else g.clone() for g in instrument.get_neuron_mask(model)]
        self._previous_kept = instrument.kept_neurons(model)
        self._active = True

    def restore(self) -> None:
        """Put back the neuron gates the model had before ``mask_neurons``."""
        if not self._active:
            return
        self._active = False
        if instrument.kept_neurons(self.model) != self._previous_kept:
            raise HeadpruneError("cannot restore a neuron mask after neurons were physically removed")
        instrument.set_neuron_mask(self.model, self._previous_gates)

    def __enter__(self) -> NeuronMask:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def mask_neurons(model: PreTrainedModel, neurons: NeuronSet) -> NeuronMask:
    """Gate the given feed-forward neurons (original indices) to 0, on top of any mask already set.

    Other neurons keep their current gate. Applied immediately; the returned handle restores the
    previous gates when used as a context manager (or via ``restore()``)::

        with mask_neurons(model, {0: [3, 17], 2: list(range(1536))}):
            logits = model(**batch).logits   # neurons masked; layer 2's block adds only its bias
        # model exactly as before

    Neurons already removed physically cannot be masked (one-line error).
    """
    chosen = model_neurons(model, neurons)
    kept = instrument.kept_neurons(model)
    for layer, layer_neurons in chosen.items():
        absent = sorted(set(layer_neurons) - set(kept[layer]))
        if absent:
            raise HeadpruneError(f"layer {layer}: neuron(s) {absent[:5]} were already removed from the model")
    handle = NeuronMask(model, chosen)
    current = instrument.get_neuron_mask(model)
    gates = neuron_gates(model)
    for layer, layer_neurons in chosen.items():
        position = {n: p for p, n in enumerate(kept[layer])}
        gates[layer][[position[n] for n in layer_neurons]] = 0.0
    instrument.set_neuron_mask(
        model, [None if cur is None and not chosen.get(layer) else gate for layer, (cur, gate) in
                enumerate(zip(current, gates, strict=True))],
    )
    return handle
