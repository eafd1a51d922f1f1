"""Feed-forward neuron criteria (``unit = "neuron"``, in ``NEURON_CRITERIA``): ``taylor``,
``fisher``, ``magnitude``, ``random``. Integrated gradients over neuron gates is ``gate_ig``
(:mod:`.gate_ig`).

Neuron j of layer l computes ``W_2[:, j] * act(W_1[j, :] x + b_1[j])``; its gate multiplies the
activation output (``instrument.NeuronProbe``), so ``dL/dxi_j`` is the neuron's analogue of the
head-mask gradient and the scores are ``[L, F]`` over the original neurons (removed ones 0).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.criteria.base import Criterion, CriterionOption, register_criterion
from attribution.criteria.gradient import FisherCriterion, TaylorCriterion, gate_gradients
from attribution.criteria.units import NEURON


@register_criterion
class NeuronTaylorCriterion(TaylorCriterion):
    """``E_x |dL/dxi_j|`` at neuron gates fixed at 1 (the head Taylor criterion of Michel et al.
    applied to neurons), L the cross-entropy (gold labels when the batch has them, else
    predictions); each layer normalised to unit L2 norm by default, as for heads. Per-layer
    normalisation makes layers comparable but not neurons with heads: rank heads and neurons
    together with ``normalize=False``, ``fisher`` or ``gate_ig``."""

    unit = "neuron"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return gate_gradients(model, batch, "neuron").abs()


@register_criterion
class NeuronFisherCriterion(FisherCriterion):
    """Kwon et al. (NeurIPS 2022): ``sum_x (dL/dxi_j)^2``, the diagonal of the empirical Fisher of
    the neuron mask (summed, not averaged, as for heads: their mask search compares heads and
    neurons in this one currency)."""

    unit = "neuron"

    def per_example(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return gate_gradients(model, batch, "neuron").square()


@register_criterion
class NeuronMagnitudeCriterion(Criterion):
    """Weight magnitude, no data: neuron j of layer l scores ``||W_1[j, :]||_2 * ||W_2[:, j]||_2``,
    the L2 norm of its input row times that of its output column.

    The choice: the neuron's output is ``W_2[:, j] * act(W_1[j, :] x + b_1[j])``, so for inputs of
    a given size its pre-activation scales with ``||W_1[j, :]||`` and what it writes with
    ``||W_2[:, j]||``; the product is invariant to moving a positive scale between the two (exact
    for ReLU, approximately so for GELU) where either norm alone is not. The bias ``b_1[j]`` is
    left out (it shifts the activation, it does not scale the path). A persistent neuron mask
    multiplies the score (a masked-out neuron scores 0, as a removed one does).
    """

    name = "magnitude"
    unit = "neuron"
    needs_data = False

    def scores(self, model: PreTrainedModel) -> torch.Tensor:
        per_layer: dict[int, torch.Tensor] = {}
        masks = instrument.get_neuron_mask(model)
        for layer, size in enumerate(instrument.neurons_per_layer(model)):
            if not size:
                continue
            w_in = instrument.intermediate_projection(model, layer).weight.detach().double()  # [F_l, D]
            w_out = instrument.ffn_output_projection(model, layer).weight.detach().double()  # [D, F_l]
            values = w_in.norm(dim=1) * w_out.norm(dim=0)
            if masks[layer] is not None:
                values = values * masks[layer].detach().double().abs().to(values.device)
            per_layer[layer] = values[None]
        return NEURON.scatter(model, per_layer, 1)[0]


@register_criterion
class NeuronRandomCriterion(Criterion):
    """Seeded uniform random scores in [0, 1) for every neuron (removed neurons 0); no data."""

    name = "random"
    unit = "neuron"
    needs_data = False
    OPTIONS = (CriterionOption("seed", 0, int, "random seed"),)

    def scores(self, model: PreTrainedModel) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.settings["seed"])
        values = torch.rand(*NEURON.shape(model), generator=generator, dtype=torch.float64)
        return NEURON.zero_removed(model, values)
