"""Importance criteria of heads and neurons: pluggable objects, a registry per unit, one score accumulator.

Built in (each module registers its criteria on import; importing this package makes
:data:`CRITERIA` (heads) and :data:`NEURON_CRITERIA` (feed-forward neurons) complete):

- ``attattr`` (:mod:`.attattr`): self-attention attribution, Hao et al.
- ``taylor``, ``fisher`` (:mod:`.gradient`): loss gradients at head gates, Michel et al. / Kwon et al.
- ``attention`` (:mod:`.attention`): peak attention probability.
- ``random`` (:mod:`.random`): the seeded baseline.
- ``unary_share``, ``pairwise_share``, ``gradient_weighted`` (:mod:`.diagnostics`).
- ``gate_ig`` (:mod:`.gate_ig`): integrated gradients over each layer's gates, for heads and for
  neurons (one currency: the target probability), with its completeness error.
- neurons (:mod:`.neurons`): ``taylor``, ``fisher``, ``magnitude``, ``random`` (and ``gate_ig``),
  scored by :func:`neuron_importance` into ``NeuronScores`` ``[L, F]``.

Write your own by subclassing :class:`Criterion` and decorating it with :func:`register_criterion`.
"""

from __future__ import annotations

# isort: off
# registration, in the order CRITERIA lists them (the paper's criterion, the baselines, diagnostics)
from attribution.criteria import attattr, gradient, attention, random, diagnostics, neurons, gate_ig  # noqa: F401

# isort: on
from attribution.criteria.attattr import AttAttrCriterion
from attribution.criteria.attention import AttentionCriterion
from attribution.criteria.base import (
    CRITERIA,
    NEURON_CRITERIA,
    Criterion,
    CriterionOption,
    CriterionOptionError,
    Reducer,
    ScoreAccumulator,
    ScorePartial,
    finalize_scores,
    head_importance,
    make_criterion,
    neuron_importance,
    register_criterion,
    scatter_heads,
    score_dataset,
    zero_removed_heads,
)
from attribution.criteria.diagnostics import GradientWeightedCriterion, PairwiseShareCriterion, UnaryShareCriterion
from attribution.criteria.gate_ig import GateAttribution, GateIGCriterion, NeuronGateIGCriterion, gate_attributions
from attribution.criteria.gradient import FisherCriterion, TaylorCriterion
from attribution.criteria.neurons import (
    NeuronFisherCriterion,
    NeuronMagnitudeCriterion,
    NeuronRandomCriterion,
    NeuronTaylorCriterion,
)
from attribution.criteria.random import RandomCriterion
from attribution.criteria.sharded import score_in_shards
from attribution.criteria.units import UNITS, Unit

__all__ = [
    "CRITERIA",
    "NEURON_CRITERIA",
    "UNITS",
    "AttAttrCriterion",
    "AttentionCriterion",
    "Criterion",
    "CriterionOption",
    "CriterionOptionError",
    "FisherCriterion",
    "GateAttribution",
    "GateIGCriterion",
    "GradientWeightedCriterion",
    "NeuronFisherCriterion",
    "NeuronGateIGCriterion",
    "NeuronMagnitudeCriterion",
    "NeuronRandomCriterion",
    "NeuronTaylorCriterion",
    "PairwiseShareCriterion",
    "RandomCriterion",
    "Reducer",
    "ScoreAccumulator",
    "ScorePartial",
    "TaylorCriterion",
    "UnaryShareCriterion",
    "Unit",
    "finalize_scores",
    "gate_attributions",
    "head_importance",
    "make_criterion",
    "neuron_importance",
    "register_criterion",
    "scatter_heads",
    "score_dataset",
    "score_in_shards",
    "zero_removed_heads",
]
