"""``taylor`` and ``fisher``: head importance from the gradient of the loss at head gates fixed at 1
(:func:`gate_gradients` also serves the neuron criteria of :mod:`.neurons`)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution.core.inputs import inference_setup, resolve_target, validate_inputs
from attribution.criteria.base import Criterion, CriterionOption, register_criterion
from attribution.criteria.units import unit_named


def gate_gradients(model: PreTrainedModel, batch: dict[str, torch.Tensor], unit: str = "head") -> torch.Tensor:
    """Per example ``dL/dxi_u`` ``[B, L, U]`` float64 through the gates of ``unit`` (heads
    ``[B, L, H]``, or neurons ``[B, L, F]``) fixed at 1, with L the cross-entropy of the gold
    labels when the batch has them, else of the predictions (removed units 0)."""
    kind = unit_named(unit)
    inputs = validate_inputs(model, batch)
    bsz = inputs["input_ids"].shape[0]
    sizes = kind.per_layer(model)
    device = inputs["input_ids"].device
    gates = {
        layer: torch.ones(bsz, size, device=device, requires_grad=True) for layer, size in enumerate(sizes) if size
    }
    with inference_setup(model), kind.probe(model) as probe, torch.enable_grad():
        probe.gates.update(gates)
        logits = model(**inputs).logits.float()
        labels = batch.get("labels")
        labels = resolve_target(None if labels is None else labels.to(device), logits)
        # Summed loss: examples are independent, so dL/dgate[b] is example b's own gradient.
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        grads = torch.autograd.grad(loss, list(gates.values()))
    return kind.scatter(model, dict(zip(gates, grads, strict=True)), bsz)


@register_criterion
class TaylorCriterion(Criterion):
    """Michel et al. (2019): ``E_x |dL/dxi_h|`` with L the cross-entropy (gold labels when the batch
    has them, else predictions); each layer normalised to unit L2 norm by default."""

    name = "taylor"
    OPTIONS = (CriterionOption("normalize", True, bool, "normalise each layer's scores to unit L2 norm"),)

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return gate_gradients(model, batch).abs()

    def finalize(self, values: torch.Tensor) -> torch.Tensor:
        if not self.settings["normalize"]:
            return values
        norms = values.norm(dim=1, keepdim=True)
        return values / torch.where(norms > 0, norms, torch.ones_like(norms))


@register_criterion
class FisherCriterion(Criterion):
    """Kwon et al. (2022): ``sum_x (dL/dxi_h)^2``, the diagonal of the empirical Fisher of the mask."""

    name = "fisher"
    reduction = "sum"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return gate_gradients(model, batch).square()
