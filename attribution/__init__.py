"""headprune's measuring side: instrument attention, score heads and tokens, explain decisions.

``attribution`` never imports ``prune``.
"""

from attribution import disentangled, relevance  # noqa: F401  (importing registers their head criteria)
from attribution.attattr import AttAttr
from attribution.errors import HeadpruneError
from attribution.importance import CRITERIA, Criterion, head_importance, register_criterion
from attribution.instrument import SUPPORTED_MODEL_TYPES, AttentionProbe
from attribution.quadrature import quadrature
from attribution.scores import HeadScores

__version__ = "0.1.0"

__all__ = [
    "AttAttr",
    "AttentionProbe",
    "CRITERIA",
    "Criterion",
    "HeadScores",
    "HeadpruneError",
    "SUPPORTED_MODEL_TYPES",
    "head_importance",
    "quadrature",
    "register_criterion",
]
