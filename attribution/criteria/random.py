"""``random``: seeded uniform scores, the baseline every criterion must beat."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.criteria.base import Criterion, CriterionOption, register_criterion, zero_removed_heads


@register_criterion
class RandomCriterion(Criterion):
    """Seeded uniform random scores in [0, 1) (removed heads 0); no data needed."""

    name = "random"
    needs_data = False
    OPTIONS = (CriterionOption("seed", 0, int, "random seed"),)

    def scores(self, model: PreTrainedModel) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.settings["seed"])
        layers = len(instrument.encoder_layers(model))
        values = torch.rand(layers, instrument.original_num_heads(model), generator=generator, dtype=torch.float64)
        return zero_removed_heads(model, values)
