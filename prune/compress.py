"""Compression to a budget: heads and feed-forward neurons scored in one currency, chosen together by
Kwon et al.'s global search under a multiply-add or latency budget, removed, and repaired without
retraining (least-squares refit of the output projections, K-prune; or today's per-head scales).

The pieces live in their own modules (criteria in :mod:`attribution.criteria`, the search in
:mod:`prune.search`, the latency model in :mod:`prune.latency`, the refit in :mod:`prune.refit`);
this module only puts them in order, so the recipe stages, the CLI and the benchmark all compress
the same way.

Decisions the papers leave open:

- **One currency.** Both units are scored by the same criterion over the same rows (Fisher by
  default, as Kwon et al.; ``gate_ig`` integrates over the gates of either unit), so a head's and
  a neuron's scores are comparable. The exchange rate is the cost model's: the search maximises
  the kept importance for the cost.
- **The cost** is either multiply-adds at the evaluation rows' mean token length (DESIGN §5) or the
  latency model's prediction at the recipe's batch size; both are per-layer counts functions.
- **The tolerance target** (``max_drop``) bisects the budget fraction, measuring each candidate on
  validation rows (never the test rows the report shows), repaired as the final model will be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.log import get_logger
from attribution.scores import HeadScores, NeuronScores
from prune.search import CostFn, SearchResult, budget_from_target, search
from prune.workflow import Metrics, pruned_copy

log = get_logger("compress")

REPAIRS = ("refit", "scales", "none")


def score_units(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    criterion: str = "fisher",
    *,
    progress: bool = True,
    **options: Any,
) -> tuple[HeadScores, NeuronScores]:
    """Heads ``[L, H]`` and neurons ``[L, F]`` scored by the same criterion on the same batches."""
    from attribution.criteria import CRITERIA, NEURON_CRITERIA, head_importance, neuron_importance

    if criterion not in CRITERIA or criterion not in NEURON_CRITERIA:
        both = sorted(set(CRITERIA) & set(NEURON_CRITERIA))
        raise HeadpruneError(f"criterion {criterion!r} does not score both heads and neurons; choose {', '.join(both)}")
    total = sum(int(b["input_ids"].shape[0]) for b in batches)
    heads = head_importance(model, batches, criterion, progress=progress, total=total, **options)
    neurons = neuron_importance(model, batches, criterion, progress=progress, total=total, **options)
    return heads, neurons


def widths(model: PreTrainedModel) -> tuple[list[int], list[int]]:
    """``(heads per layer, neurons per layer)`` the model has now."""
    return instrument.heads_per_layer(model), instrument.neurons_per_layer(model)


def cost_function(model: PreTrainedModel, kind: str, *, seq_len: float, latency_model: Any = None) -> CostFn:
    """``cost(heads_per_layer, neurons_per_layer)``: multiply-adds per example at ``seq_len``
    tokens (``"flops"``) or the latency model's milliseconds (``"latency"``)."""
    if kind == "flops":
        from prune.latency import flops, model_shape

        shape = model_shape(model)
        return lambda heads, neurons: flops(shape, heads, neurons, seq_len)
    if kind == "latency":
        if latency_model is None:
            raise HeadpruneError("a latency target needs a latency model (prune.latency.fit_latency_model)")
        return latency_model.predict
    raise HeadpruneError(f"cost must be flops or latency, got {kind!r}")


def plan(
    dense: PreTrainedModel,
    head_scores: HeadScores,
    neuron_scores: NeuronScores,
    cost: CostFn,
    fraction: float,
    *,
    kind: str = "flops",
    heads_only: bool = False,
) -> SearchResult:
    """The search at ``fraction`` of the dense model's cost: which heads and neurons go.

    ``heads_only`` keeps every neuron (the head-pruning baseline at the same budget)."""
    heads, neurons = widths(dense)
    minimum = max(neurons) if heads_only else 0
    budget = budget_from_target(cost, fraction, heads, neurons, target=kind, min_neurons_per_layer=minimum)
    return search(
        head_scores.values,
        neuron_scores.values,
        cost,
        budget,
        present_heads=instrument.kept_heads(dense),
        present_neurons=instrument.kept_neurons(dense),
        min_neurons_per_layer=minimum,
    )


@dataclass
class CompressOutcome:
    """A compressed model, the search that chose it, its repair and its metrics (``"pruned"`` and,
    repaired, ``"repaired"``)."""

    model: PreTrainedModel
    search: SearchResult
    repair: Any = None  # prune.refit.RefitResult or prune.repair.RepairResult
    metrics: dict[str, Metrics] = field(default_factory=dict)

    @property
    def final_metrics(self) -> Metrics:
        return self.metrics.get("repaired", self.metrics.get("pruned", {}))


def apply(
    dense: PreTrainedModel,
    result: SearchResult,
    *,
    repair: str = "refit",
    calibration: Sequence[dict[str, torch.Tensor]] | None = None,
    held_out: Sequence[dict[str, torch.Tensor]] | None = None,
    evaluate: Callable[[PreTrainedModel], Metrics] | None = None,
    measure_unrepaired: bool = True,
    progress: bool = False,
) -> CompressOutcome:
    """Remove what ``result`` says from a copy of ``dense``, evaluate, repair against ``dense``
    (``refit``: least squares of the output projections, guarded by ``held_out``; ``scales``: the
    per-head rescaling of :mod:`prune.repair`; ``none``), evaluate again."""
    if repair not in REPAIRS:
        raise HeadpruneError(f"repair must be one of {', '.join(REPAIRS)}, got {repair!r}")
    model = pruned_copy(dense, result.removed_heads, result.removed_neurons)
    outcome = CompressOutcome(model, result)
    if evaluate is not None and (measure_unrepaired or repair == "none"):
        outcome.metrics["pruned"] = evaluate(model)
    removed = any(result.removed_heads.values()) or any(result.removed_neurons.values())
    if repair != "none" and removed:
        if not calibration:
            raise HeadpruneError("repair needs calibration batches")
        if repair == "refit":
            from prune.refit import refit

            outcome.repair = refit(model, dense, list(calibration), held_out=held_out, progress=progress)
        else:
            from prune.repair import repair as rescale

            outcome.repair = rescale(model, list(calibration), dense=dense, progress=progress)
        if evaluate is not None:
            outcome.metrics["repaired"] = evaluate(model)
    return outcome


def compress_to_tolerance(
    dense: PreTrainedModel,
    head_scores: HeadScores,
    neuron_scores: NeuronScores,
    cost: CostFn,
    *,
    kind: str,
    max_drop: float,
    dense_metric: float,
    metric_of: Callable[[PreTrainedModel], float],
    repair: str = "refit",
    calibration: Sequence[dict[str, torch.Tensor]] | None = None,
    held_out: Sequence[dict[str, torch.Tensor]] | None = None,
    steps: int = 6,
) -> tuple[SearchResult, list[Any]]:
    """The most compression whose repaired metric (``metric_of``, on validation rows) stays within
    ``max_drop`` of ``dense_metric``: bisection over the budget fraction (``prune.search``)."""
    from prune.search import search_tolerance

    def make(fraction: float) -> SearchResult:
        return plan(dense, head_scores, neuron_scores, cost, fraction, kind=kind)

    def evaluate(result: SearchResult) -> float:
        outcome = apply(dense, result, repair=repair, calibration=calibration, held_out=held_out,
                        measure_unrepaired=False)
        return float(metric_of(outcome.model))

    return search_tolerance(evaluate, dense_metric, max_drop, make, steps=steps)


def counts_text(heads: Sequence[int], neurons: Sequence[int]) -> str:
    """``heads 7 8 3 4 7 7 | neurons 1536 812 ...`` for logs and reports."""
    return f"heads {' '.join(map(str, heads))} | neurons {' '.join(map(str, neurons))}"
