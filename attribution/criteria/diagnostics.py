"""Head diagnostics as criteria: ``unary_share`` and ``pairwise_share`` (the disentangled-attention
decomposition, :mod:`attribution.disentangled`) and ``gradient_weighted`` (Chefer's per-head
weights, :mod:`attribution.relevance`)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.inputs import validate_inputs
from attribution.criteria.base import Criterion, CriterionOption, register_criterion, scatter_heads
from attribution.disentangled import head_unary_share
from attribution.relevance import TokenRelevance
from attribution.relevance_rules import chefer_weights, pair_mask


@register_criterion
class UnaryShareCriterion(Criterion):
    """Mean over examples of each head's unary share of the attention-logit variance over keys
    (high = query-independent, "degenerate" head). See :mod:`attribution.disentangled`."""

    name = "unary_share"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return head_unary_share(model, batch)


@register_criterion
class PairwiseShareCriterion(Criterion):
    """``1 - unary share``, averaged over examples: content-driven heads score high (pruning by
    this criterion removes the most query-independent heads first). Removed heads score 0."""

    name = "pairwise_share"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        share = head_unary_share(model, batch)
        present = torch.zeros_like(share, dtype=torch.bool)
        for layer, heads in enumerate(instrument.kept_heads(model)):
            present[:, layer, heads] = True
        return torch.where(present, 1.0 - share, torch.zeros_like(share))


@register_criterion
class GradientWeightedCriterion(Criterion):
    """Chefer's per-head weights as head importance: per example, the mean over real token pairs of
    ``(∇A_h ⊙ A_h)^+`` with ∇A the gradient of the target logit (the predicted class, or the gold
    label with ``target="gold"``); mean over examples."""

    name = "gradient_weighted"
    OPTIONS = (
        CriterionOption(
            "target", "predicted", str, "class attributed: the predicted one or the gold label",
            choices=("predicted", "gold"),
        ),
    )  # fmt: skip

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        gold = self.settings["target"] == "gold"
        target = batch.get("labels") if gold else None
        if gold and target is None:
            raise HeadpruneError("gradient_weighted with target='gold' needs labels in the batch")
        inputs = validate_inputs(model, batch)
        helper = TokenRelevance(model)
        probs, grads, _, _ = helper._attentions_and_gradients(inputs, target)
        pair = pair_mask(inputs["attention_mask"])[:, None]
        count = pair.sum(dim=(2, 3))  # [B, 1]
        per_layer: dict[int, torch.Tensor] = {}
        for layer, (layer_probs, layer_grads) in enumerate(zip(probs, grads, strict=True)):
            if layer_probs is not None and layer_probs.shape[1]:
                weights = chefer_weights(layer_probs, layer_grads) * pair
                per_layer[layer] = weights.sum(dim=(2, 3)) / count
        return scatter_heads(model, per_layer, inputs["input_ids"].shape[0])
