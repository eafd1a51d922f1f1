"""``attention``: the head's peak attention probability, a cheap data-driven baseline."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.inputs import inference_setup, validate_inputs
from attribution.criteria.base import Criterion, register_criterion, scatter_heads


@register_criterion
class AttentionCriterion(Criterion):
    """Mean over examples of the head's largest attention probability (padding excluded)."""

    name = "attention"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = validate_inputs(model, batch)
        query_valid = inputs["attention_mask"].bool()[:, None, :, None]
        with inference_setup(model), instrument.AttentionProbe(model, capture=True) as probe, torch.no_grad():
            model(**inputs)
            peaks = {
                layer: probs.masked_fill(~query_valid, 0.0).flatten(2).max(dim=-1).values
                for layer, probs in probe.attentions.items()
            }
        return scatter_heads(model, peaks, inputs["input_ids"].shape[0])
