"""Which heads to drop, chosen from a ``HeadScores`` (higher score = more important).

- ``select_global``: the globally lowest-scored heads, by fraction (``sparsity``) or ``count``;
  ``min_per_layer`` keeps at least that many heads in every layer.
- ``select_per_layer``: keep the ``keep`` best heads of every layer.
- ``iterative_pruning``: Michel et al. (2019) / HF bertology: mask a small fraction of the
  least important heads, recompute the scores on the masked model, repeat while the metric stays
  within ``tolerance`` of the dense model's.

Every selection returns a head set ``{layer: [original head, ...]}`` to pass to
``prune.mask_heads`` or ``prune.remove_heads``. Heads absent from the model (``present``) are
never chosen again; ties are broken by position (lower layer, then lower head, goes first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record
from attribution.core.log import get_logger
from attribution.scores import HeadScores
from prune.masking import active_heads, count_heads, mask_heads

Heads = dict[int, list[int]]

log = get_logger("strategies")


def check_scores(scores: HeadScores, model_or_shape: PreTrainedModel | tuple[int, int]) -> None:
    """One-line error unless ``scores`` has the model's ``[L, H]`` shape and finite values."""
    if not isinstance(scores, HeadScores):
        raise HeadpruneError(f"expected HeadScores, got {type(scores).__name__}")
    if isinstance(model_or_shape, tuple):
        shape = model_or_shape
    else:
        shape = (len(instrument.encoder_layers(model_or_shape)), instrument.original_num_heads(model_or_shape))
    if scores.shape != tuple(shape):
        raise HeadpruneError(
            f"the scores are for a model with {scores.shape[0]} layers x {scores.shape[1]} heads, "
            f"but this model has {shape[0]} x {shape[1]}"
        )
    if not bool(torch.isfinite(scores.values).all()):
        raise HeadpruneError("the head scores contain NaN or infinite values")


def _present(scores: HeadScores, present: Sequence[Sequence[int]] | None) -> list[list[int]]:
    layers, heads = scores.shape
    if present is None:
        return [list(range(heads)) for _ in range(layers)]
    if len(present) != layers:
        raise HeadpruneError(f"present heads given for {len(present)} layers, the scores have {layers}")
    return [sorted(int(h) for h in p) for p in present]


def _check_min(min_per_layer: int, heads: int) -> None:
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, int) or not 0 <= min_per_layer <= heads:
        raise HeadpruneError(f"min_per_layer must be an integer in 0..{heads}, got {min_per_layer!r}")


def select_global(
    scores: HeadScores,
    *,
    sparsity: float | None = None,
    count: int | None = None,
    min_per_layer: int = 0,
    present: Sequence[Sequence[int]] | None = None,
) -> Heads:
    """The lowest-scored heads over the whole model.

    Args:
        scores: ``[L, H]`` importances (original head indices).
        sparsity: in (0, 1): after pruning, ``round(sparsity * L * H)`` of the original heads are
            gone (heads already absent count towards it).
        count: alternatively, exactly this many more heads to drop.
        min_per_layer: never leave a layer with fewer heads than this.
        present: per layer, the heads still in the model (default: all).

    A selection that would leave no head in the model, or that cannot be met under
    ``min_per_layer``, raises ``HeadpruneError``.
    """
    layers, heads = scores.shape
    if not torch.isfinite(scores.values).all():
        raise HeadpruneError("the head scores contain NaN or infinite values")
    _check_min(min_per_layer, heads)
    kept = _present(scores, present)
    available = sum(len(k) for k in kept)
    total = layers * heads
    if (sparsity is None) == (count is None):
        raise HeadpruneError("give exactly one of sparsity or count")
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise HeadpruneError(f"sparsity must be a fraction strictly between 0 and 1, got {sparsity!r}")
        n = round(sparsity * total) - (total - available)
        if n <= 0:
            raise HeadpruneError(
                f"sparsity {sparsity} asks for {round(sparsity * total)} of {total} heads pruned; "
                f"{total - available} already are, so there is nothing to prune"
            )
    else:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise HeadpruneError(f"count must be a positive integer, got {count!r}")
        n = count
    if n >= available:
        raise HeadpruneError(f"cannot prune {n} heads: the model has {available}, and at least one must remain")
    left = [len(k) for k in kept]
    chosen: Heads = {}
    for layer, head in scores.ranking(descending=False):
        if n == 0:
            break
        if head in kept[layer] and left[layer] > min_per_layer:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
            n -= 1
    if n > 0:
        raise HeadpruneError(
            f"cannot prune that many heads while keeping {min_per_layer} per layer "
            f"({count_heads(chosen)} could be pruned)"
        )
    return {layer: sorted(chosen[layer]) for layer in sorted(chosen)}


def select_per_layer(
    scores: HeadScores, keep: int, *, present: Sequence[Sequence[int]] | None = None
) -> Heads:
    """Keep the ``keep`` highest-scored present heads of every layer; return the rest."""
    layers, heads = scores.shape
    if not torch.isfinite(scores.values).all():
        raise HeadpruneError("the head scores contain NaN or infinite values")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= heads:
        raise HeadpruneError(f"keep-per-layer must be an integer in 1..{heads}, got {keep!r}")
    kept = _present(scores, present)
    chosen: Heads = {}
    for layer in range(layers):
        order = sorted(kept[layer], key=lambda h, layer=layer: (-float(scores.values[layer, h]), h))
        drop = sorted(order[keep:])
        if drop:
            chosen[layer] = drop
    if not chosen:
        raise HeadpruneError(f"keeping {keep} heads per layer prunes nothing (no layer has more)")
    return chosen


def select_heads(
    scores: HeadScores,
    *,
    sparsity: float | None = None,
    count: int | None = None,
    keep_per_layer: int | None = None,
    min_per_layer: int = 0,
    present: Sequence[Sequence[int]] | None = None,
) -> Heads:
    """Dispatch to ``select_global`` (sparsity/count) or ``select_per_layer`` (keep_per_layer)."""
    options = {"sparsity": sparsity, "count": count, "keep_per_layer": keep_per_layer}
    given = [name for name, value in options.items() if value is not None]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise HeadpruneError(f"choose exactly one of sparsity, count or keep_per_layer (got {got})")
    if keep_per_layer is not None:
        return select_per_layer(scores, max(keep_per_layer, min_per_layer), present=present)
    return select_global(scores, sparsity=sparsity, count=count, min_per_layer=min_per_layer, present=present)


# --------------------------------------------------------------------------------------------
# Iterative pruning
# --------------------------------------------------------------------------------------------


@dataclass
class IterationRecord:
    """One round: ``pruned`` heads masked in total after it, their fraction and the metric. Stored
    inside an ``IterativeResult`` record (not a file of its own, so its JSON has no format tag)."""

    round: int
    pruned: int
    sparsity: float
    metric: float
    accepted: bool
    heads: Heads = field(default_factory=dict)


@dataclass
class IterativeResult(Record):
    """Outcome of ``iterative_pruning``: ``heads`` is the largest accepted head set (original
    indices), ``threshold = dense_metric * (1 - tolerance)``. A ``headprune.IterativeResult``
    record; layer keys of head sets are strings in ``to_dict`` (as in JSON), integers again after
    ``from_dict``."""

    FORMAT: ClassVar[str] = "headprune.IterativeResult"
    VERSION: ClassVar[int] = 1

    heads: Heads
    dense_metric: float
    final_metric: float
    tolerance: float
    threshold: float
    step: float
    history: list[IterationRecord] = field(default_factory=list)
    stopped_because: str = ""


def iterative_pruning(
    model: PreTrainedModel,
    score_fn: Callable[[PreTrainedModel], HeadScores],
    metric_fn: Callable[[PreTrainedModel], float],
    *,
    step: float = 0.1,
    tolerance: float = 0.01,
    min_per_layer: int = 0,
    max_sparsity: float = 1.0,
    progress: bool = True,
) -> IterativeResult:
    """Michel et al. / bertology: prune by masking in rounds while the metric holds up.

    Each round scores the heads of the currently masked model (``score_fn``), masks the
    ``max(1, round(step * L * H))`` lowest-scored active heads (respecting ``min_per_layer``,
    never the last head), and measures ``metric_fn`` (higher is better, e.g. accuracy on held-out
    data). It stops when the metric falls below ``dense * (1 - tolerance)`` — that round is
    rejected, the previous head set is the result — or when no head can be masked any more, or
    when the next round would exceed ``max_sparsity``. The model's mask is restored on return;
    apply ``result.heads`` with ``mask_heads`` or ``remove_heads``.
    """
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < 1:
        raise HeadpruneError(f"step must be a fraction strictly between 0 and 1, got {step!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise HeadpruneError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    if not 0 < max_sparsity <= 1:
        raise HeadpruneError(f"max_sparsity must be in (0, 1], got {max_sparsity!r}")
    layers, heads = len(instrument.encoder_layers(model)), instrument.original_num_heads(model)
    _check_min(min_per_layer, heads)
    total = layers * heads
    per_round = max(1, round(step * total))
    dense = float(metric_fn(model))
    threshold = dense * (1 - tolerance)
    accepted: Heads = {}
    final_metric = dense
    history: list[IterationRecord] = []
    reason = ""
    bar = tqdm(desc="iterative pruning", unit="round", disable=not progress)
    round_index = 0
    while True:
        round_index += 1
        with mask_heads(model, accepted) if accepted else contextlib.nullcontext():
            present = active_heads(model)
            scores = score_fn(model)
            check_scores(scores, (layers, heads))
            n_active = sum(len(p) for p in present)
            prunable = sum(max(0, len(p) - min_per_layer) for p in present)
            n = min(per_round, n_active - 1, prunable)
            if (total - n_active + n) / total > max_sparsity + 1e-9:
                reason = f"the next round would exceed max_sparsity={max_sparsity}"
                break
            if n <= 0:
                reason = "no head can be pruned any more (one head or min_per_layer left)"
                break
            chosen = select_global(scores, count=n, min_per_layer=min_per_layer, present=present)
        candidate = {
            layer: sorted(set(accepted.get(layer, [])) | set(chosen.get(layer, [])))
            for layer in sorted(set(accepted) | set(chosen))
        }
        with mask_heads(model, candidate):
            metric = float(metric_fn(model))
        pruned = count_heads(candidate) + (total - sum(instrument.heads_per_layer(model)))
        ok = metric >= threshold
        history.append(IterationRecord(round_index, pruned, pruned / total, metric, ok, candidate))
        log.debug(
            "iterative pruning round %d: %d heads pruned (%.1f%%), metric %.4f, %s",
            round_index, pruned, 100 * pruned / total, metric, "accepted" if ok else "rejected",
        )
        bar.update(1)
        bar.set_postfix(pruned=pruned, metric=f"{metric:.4f}")
        if not ok:
            reason = f"metric {metric:.4f} fell below {threshold:.4f} (dense {dense:.4f}, tolerance {tolerance})"
            break
        accepted, final_metric = candidate, metric
    bar.close()
    log.debug("iterative pruning stopped: %s", reason)
    return IterativeResult(accepted, dense, final_metric, float(tolerance), threshold, float(step), history, reason)


def fraction_pruned(model: PreTrainedModel, heads: Heads | None = None) -> float:
    """Fraction of the original heads absent from ``model`` plus those in ``heads``."""
    layers, per_layer = len(instrument.encoder_layers(model)), instrument.original_num_heads(model)
    total = layers * per_layer
    gone = total - sum(instrument.heads_per_layer(model)) + (count_heads(heads) if heads else 0)
    return gone / total
