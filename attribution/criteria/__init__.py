"""Head-importance criteria: pluggable objects, one registry, one score accumulator.

Built in (each module registers its criteria on import; importing this package makes
:data:`CRITERIA` complete):

- ``attattr`` (:mod:`.attattr`): self-attention attribution, Hao et al.
- ``taylor``, ``fisher`` (:mod:`.gradient`): loss gradients at head gates, Michel et al. / Kwon et al.
- ``attention`` (:mod:`.attention`): peak attention probability.
- ``random`` (:mod:`.random`): the seeded baseline.
- ``unary_share``, ``pairwise_share``, ``gradient_weighted`` (:mod:`.diagnostics`).

Write your own by subclassing :class:`Criterion` and decorating it with :func:`register_criterion`.
"""

from __future__ import annotations

# isort: off
# registration, in the order CRITERIA lists them (the paper's criterion, the baselines, diagnostics)
from attribution.criteria import attattr, gradient, attention, random, diagnostics  # noqa: F401

# isort: on
from attribution.criteria.attattr import AttAttrCriterion
from attribution.criteria.attention import AttentionCriterion
from attribution.criteria.base import (
    CRITERIA,
    Criterion,
    CriterionOption,
    CriterionOptionError,
    Reducer,
    ScoreAccumulator,
    ScorePartial,
    finalize_scores,
    head_importance,
    make_criterion,
    register_criterion,
    scatter_heads,
    score_dataset,
    zero_removed_heads,
)
from attribution.criteria.diagnostics import GradientWeightedCriterion, PairwiseShareCriterion, UnaryShareCriterion
from attribution.criteria.gradient import FisherCriterion, TaylorCriterion
from attribution.criteria.random import RandomCriterion

__all__ = [
    "CRITERIA",
    "AttAttrCriterion",
    "AttentionCriterion",
    "Criterion",
    "CriterionOption",
    "CriterionOptionError",
    "FisherCriterion",
    "GradientWeightedCriterion",
    "PairwiseShareCriterion",
    "RandomCriterion",
    "Reducer",
    "ScoreAccumulator",
    "ScorePartial",
    "TaylorCriterion",
    "UnaryShareCriterion",
    "finalize_scores",
    "head_importance",
    "make_criterion",
    "register_criterion",
    "scatter_heads",
    "score_dataset",
    "zero_removed_heads",
]
