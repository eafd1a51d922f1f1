"""The prunable units criteria score: attention heads and feed-forward neurons.

A :class:`Unit` says, for one kind, how many units each layer had before pruning (the width of
``[L, U]`` results), which original indices a layer still has, the probe whose ``gates`` gate them
(``AttentionProbe`` for heads, ``NeuronProbe`` for neurons: ``gates[l]`` ``[U_l]`` or ``[B, U_l]``
over layer l's *current* units, differentiable) and the scores class results are wrapped in.
Criteria name their unit (``Criterion.unit``); the accumulator and ``finalize_scores`` read the
rest from here, so one accumulation serves every unit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.scores import HeadScores, NeuronScores, UnitScores


@dataclass(frozen=True)
class Unit:
    """One kind of prunable unit (see the module docstring)."""

    name: str
    plural: str
    original: Callable[[PreTrainedModel], int]  # units per layer before pruning: U in [L, U]
    kept: Callable[[PreTrainedModel], list[list[int]]]  # per layer, original indices still present
    probe: Callable[[PreTrainedModel], AbstractContextManager[Any]]  # a probe with ``.gates``
    scores: type[UnitScores]

    def shape(self, model: PreTrainedModel) -> tuple[int, int]:
        """``(L, U)`` of this unit's results for ``model``."""
        return (len(instrument.encoder_layers(model)), self.original(model))

    def per_layer(self, model: PreTrainedModel) -> list[int]:
        """How many units each layer has now."""
        return [len(kept) for kept in self.kept(model)]

    def scatter(self, model: PreTrainedModel, per_layer: dict[int, torch.Tensor], batch_size: int) -> torch.Tensor:
        """``{layer: [B, U_l]}`` over a layer's current units -> ``[B, L, U]`` float64 over the
        original units (removed units 0)."""
        kept = self.kept(model)
        out = torch.zeros(batch_size, len(kept), self.original(model), dtype=torch.float64)
        for layer, values in per_layer.items():
            if kept[layer]:
                out[:, layer, kept[layer]] = values.detach().double().cpu()
        return out

    def zero_removed(self, model: PreTrainedModel, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[..., L, U]`` with the removed units of ``model`` set to 0."""
        removed = torch.ones(values.shape[-2:], dtype=torch.bool)
        for layer, kept in enumerate(self.kept(model)):
            removed[layer, kept] = False
        return values.masked_fill(removed, 0.0)

    def provenance(self, model: PreTrainedModel) -> dict[str, Any]:
        """What the scores record about the model's units: the kept heads (a short list), or the
        neurons' widths and the removed neurons (the kept ones would be thousands of numbers)."""
        if self.name == "head":
            return {"kept_heads": self.kept(model)}
        original = self.original(model)
        kept = self.kept(model)
        removed = [sorted(set(range(original)) - set(layer)) for layer in kept]
        return {"neurons_per_layer": [len(layer) for layer in kept], "removed_neurons": removed}


HEAD = Unit(
    "head",
    "heads",
    lambda model: instrument.original_num_heads(model),
    lambda model: instrument.kept_heads(model),
    lambda model: instrument.AttentionProbe(model),
    HeadScores,
)
NEURON = Unit(
    "neuron",
    "neurons",
    lambda model: instrument.original_intermediate_size(model),
    lambda model: instrument.kept_neurons(model),
    lambda model: instrument.NeuronProbe(model),
    NeuronScores,
)
UNITS: dict[str, Unit] = {"head": HEAD, "neuron": NEURON}


def unit_named(name: str) -> Unit:
    """The unit called ``name`` (``head`` or ``neuron``); a one-line error for anything else."""
    if name not in UNITS:
        raise HeadpruneError(f"unknown unit {name!r}; choose one of {', '.join(UNITS)}")
    return UNITS[name]
