"""headprune's measuring side: instrument attention and feed-forward neurons, score heads, neurons
and tokens, explain decisions.

``attribution`` never imports ``prune``. Names are loaded on first use, so importing the package
(as the CLI does for ``--help``) does not pull in torch and transformers.
"""

from __future__ import annotations

from attribution.core.exports import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "AttAttr": "attribution.attattr",
    "AttentionProbe": "attribution.instrument",
    "CRITERIA": "attribution.criteria",
    "Criterion": "attribution.criteria",
    "CriterionOption": "attribution.criteria",
    "HeadScores": "attribution.scores",
    "HeadpruneError": "attribution.core.errors",
    "NEURON_CRITERIA": "attribution.criteria",
    "NeuronProbe": "attribution.instrument",
    "NeuronScores": "attribution.scores",
    "SUPPORTED_MODEL_TYPES": "attribution.instrument",
    "head_importance": "attribution.criteria",
    "make_criterion": "attribution.criteria",
    "neuron_importance": "attribution.criteria",
    "quadrature": "attribution.quadrature",
    "register_criterion": "attribution.criteria",
    "score_dataset": "attribution.criteria",
}


__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
