"""The prune workflow: the one place the CLI, the recipe pipeline and the scripts call.

select -> remove -> evaluate -> repair (against the dense model) -> evaluate -> save, plus the two
policies around it: which fraction to sweep (:func:`sweep_point`) and which criterion and fraction
the final model takes (:func:`decide`, returning a typed :class:`PruneDecision`).

Heads are always removed physically here (masking and removal give the same model; see
``tests/test_surgery.py``), so the model that is evaluated is the model that is saved and timed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from attribution import instrument
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record, timing_field
from attribution.scores import HeadScores
from prune.strategies import select_heads

if TYPE_CHECKING:
    from attribution.core.data import DataSpec

Heads = dict[int, list[int]]
Metrics = dict[str, float]
# a tolerance for comparing metrics that are ratios of small integers (accuracy of N rows)
METRIC_EPS = 1e-12


@dataclass
class CurvePoint:
    """One point of a pruning curve: ``metric`` after removing ``fraction`` of all heads
    (None with ``error`` when the fraction cannot be pruned, e.g. under ``min_per_layer``)."""

    fraction: float
    heads_removed: int | None
    metric: float | None
    error: str | None = None


@dataclass
class SweepResult(Record):
    """Pruning curves: per criterion, the metric at each swept fraction (``sweep.json``)."""

    FORMAT = "headprune.SweepResult"

    metric: str
    split: str
    examples: int
    total_heads: int
    dense: float
    fractions: list[float]
    curves: dict[str, list[CurvePoint]]

    def best_fraction(self, criterion: str, max_drop: float) -> tuple[float, float | None]:
        """The largest swept fraction whose metric stays within ``max_drop`` of dense, and that
        metric; ``(0.0, None)`` when none does."""
        floor = self.dense - max_drop
        ok = [p for p in self.curves[criterion] if p.metric is not None and p.metric >= floor - METRIC_EPS]
        if not ok:
            return 0.0, None
        top = max(ok, key=lambda p: p.fraction)
        return top.fraction, top.metric


@dataclass
class PruneDecision(Record):
    """Which criterion's ranking the final model follows, which heads it loses, and why."""

    FORMAT = "headprune.PruneDecision"

    criterion: str
    chosen_by: str
    reason: str
    removed: dict[int, list[int]]
    candidates: list[str] | None = None

    @property
    def heads(self) -> Heads:
        return {int(k): list(v) for k, v in self.removed.items()}


@dataclass
class Target:
    """How many heads the final model loses: exactly one of the three."""

    fraction: float | None = None
    keep_per_layer: int | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("fraction", "keep_per_layer", "max_drop") if getattr(self, k) is not None]
        if len(given) != 1:
            raise HeadpruneError(f"choose exactly one of fraction, keep_per_layer, max_drop (got {given or 'none'})")


def decide(
    scores: Mapping[str, HeadScores],
    target: Target,
    *,
    criterion: str = "best",
    sweep: SweepResult | None = None,
    min_per_layer: int = 0,
) -> PruneDecision:
    """The pruning policy: which criterion and how many heads.

    ``criterion="best"`` picks, among the scored criteria (``random`` excluded unless it is the
    only one), the one whose swept curve allows the largest fraction within ``target.max_drop``;
    ties go to the higher metric, then to the order of ``scores``. ``target.max_drop`` takes the
    largest swept fraction within the tolerance (none: the model is left unpruned).
    """
    candidates = [c for c in scores if c != "random"] or list(scores)
    needs_sweep = criterion == "best" or target.max_drop is not None
    if needs_sweep and sweep is None:
        raise HeadpruneError("choosing the criterion or the fraction by tolerance needs a sweep")
    tolerance = target.max_drop if target.max_drop is not None else 0.0
    chosen_by = criterion
    if criterion == "best":
        assert sweep is not None

        def key(name: str) -> tuple[float, float, int]:
            fraction, metric = sweep.best_fraction(name, tolerance)
            return (-fraction, -(metric or 0.0), candidates.index(name))

        criterion = sorted(candidates, key=key)[0]
    if criterion not in scores:
        raise HeadpruneError(f"criterion {criterion!r} was not scored (scored: {', '.join(scores)})")
    ranking = scores[criterion]
    if target.fraction is not None:
        reason = f"fixed fraction {target.fraction}"
        heads = select_heads(ranking, sparsity=target.fraction, min_per_layer=min_per_layer)
    elif target.keep_per_layer is not None:
        reason = f"keep the best {target.keep_per_layer} heads of every layer"
        heads = select_heads(ranking, keep_per_layer=target.keep_per_layer, min_per_layer=min_per_layer)
    else:
        assert sweep is not None
        fraction, metric = sweep.best_fraction(criterion, tolerance)
        if metric is None:
            reason = (
                f"no swept fraction keeps {sweep.metric} within {tolerance} of dense "
                f"({sweep.dense:.4f}); the model is left unpruned"
            )
            heads = {}
        else:
            reason = (
                f"the largest swept fraction whose {sweep.split} {sweep.metric} stays within "
                f"{tolerance:g} of the dense model's: {metric:.4f} vs {sweep.dense:.4f}"
            )
            heads = select_heads(ranking, sparsity=fraction, min_per_layer=min_per_layer)
    return PruneDecision(
        criterion=criterion,
        chosen_by=chosen_by,
        reason=reason,
        removed={int(k): list(v) for k, v in heads.items()},
        candidates=candidates if chosen_by == "best" else None,
    )


def pruned_copy(
    model: PreTrainedModel,
    heads: Mapping[int, Sequence[int]],
    neurons: Mapping[int, Sequence[int]] | None = None,
) -> PreTrainedModel:
    """A deep copy of ``model`` with ``heads`` and feed-forward ``neurons`` (original indices,
    ``{layer: [index, ...]}``) physically removed."""
    from prune.surgery import remove_heads, remove_neurons

    pruned = copy.deepcopy(model)
    if any(heads.values()):
        remove_heads(pruned, {int(k): list(v) for k, v in heads.items() if v})
    if neurons and any(neurons.values()):
        remove_neurons(pruned, {int(k): list(v) for k, v in neurons.items() if v})
    return pruned


def sweep_point(
    model: PreTrainedModel,
    scores: HeadScores,
    fraction: float,
    measure: Callable[[PreTrainedModel], float],
    *,
    min_per_layer: int = 0,
) -> CurvePoint:
    """Remove the lowest-ranked ``fraction`` of all heads (on a copy) and ``measure`` the result."""
    try:
        heads = select_heads(scores, sparsity=fraction, min_per_layer=min_per_layer)
        pruned = pruned_copy(model, heads)
    except HeadpruneError as error:  # e.g. min_per_layer makes the fraction impossible
        return CurvePoint(fraction, None, None, str(error))
    return CurvePoint(fraction, sum(len(h) for h in heads.values()), float(measure(pruned)))


@dataclass
class PruneOutcome:
    """What :func:`prune_and_repair` did: the pruned (and maybe repaired) model and its metrics
    (``"pruned"`` and, with repair, ``"repaired"``)."""

    model: PreTrainedModel
    removed: Heads
    metrics: dict[str, Metrics] = field(default_factory=dict)
    repair: Any = None  # prune.repair.RepairResult when repaired

    @property
    def final_metrics(self) -> Metrics:
        return self.metrics.get("repaired", self.metrics.get("pruned", {}))


def prune_and_repair(
    dense: PreTrainedModel,
    heads: Mapping[int, Sequence[int]],
    *,
    evaluate: Callable[[PreTrainedModel], Metrics] | None = None,
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
    progress: bool = False,
) -> PruneOutcome:
    """Remove ``heads`` from a copy of ``dense``, evaluate, repair against ``dense`` on the
    ``calibration`` batches (when given and something was removed), evaluate again.

    ``evaluate`` maps a model to its metrics (every process of a multi-process run must call it).
    """
    model = pruned_copy(dense, heads)
    outcome = PruneOutcome(model, {int(k): list(v) for k, v in heads.items() if v})
    if evaluate is not None:
        outcome.metrics["pruned"] = evaluate(model)
    if calibration is not None and outcome.removed:
        from prune.repair import repair

        outcome.repair = repair(model, list(calibration), dense=dense, progress=progress)
        if evaluate is not None:
            outcome.metrics["repaired"] = evaluate(model)
    return outcome


def save_checked(
    model: PreTrainedModel,
    directory: str | Path,
    tokenizer: Any,
    probe: Mapping[str, torch.Tensor],
    *,
    atol: float = 1e-4,
    remote_code: bool = False,
) -> float:
    """Save a pruned checkpoint (``remote_code``: with the modeling file, ``save_pruned``) and prove
    it reloads into the same model: the largest logit difference on ``probe`` (a tokenizer batch);
    more than ``atol`` raises."""
    from prune.checkpoints import load_model, save_pruned

    save_pruned(model, directory, tokenizer, remote_code=remote_code)
    reloaded, _ = load_model(str(directory), tokenizer=False)
    with torch.no_grad():
        diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    if diff > atol:
        raise HeadpruneError(f"the saved pruned model does not reload identically (logits differ by {diff:.3g})")
    return diff


def head_counts(model: PreTrainedModel) -> tuple[int, int, list[list[int]]]:
    """``(heads removed, heads originally, kept heads per layer)`` of a (pruned) model."""
    kept = instrument.kept_heads(model)
    total = len(kept) * instrument.original_num_heads(model)
    return total - sum(len(k) for k in kept), total, kept


# --------------------------------------------------------------------------------------------
# Pruning a checkpoint from a scores file (``headprune prune``)
# --------------------------------------------------------------------------------------------


@dataclass
class PruneReport(Record):
    """What :func:`prune_checkpoint` did; saved as ``prune_report.json`` beside the pruned weights."""

    FORMAT = "headprune.PruneReport"
    VERSION = 2  # version 1 called the criterion "method"

    model: str
    scores: str
    criterion: str
    strategy: dict[str, Any]
    removed: dict[int, list[int]]
    kept: list[list[int]]
    heads_before: int
    heads_after: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    repair: dict[str, Any] | None = None
    iterative: dict[str, Any] | None = None
    seconds: float = timing_field()  # in memory only (io.timing_field)


REPORT_NAME = "prune_report.json"


def prune_checkpoint(
    model_name: str,
    scores_path: str | Path,
    out: str | Path,
    *,
    sparsity: float | None = None,
    count: int | None = None,
    keep_per_layer: int | None = None,
    iterative: bool = False,
    tolerance: float = 0.01,
    step: float = 0.1,
    min_per_layer: int = 0,
    repair: bool = False,
    evaluate: bool = False,
    data: DataSpec | str = "tweets",
    metric: str = "accuracy",
    eval_split: str = "validation",
    eval_examples: int = 1000,
    score_examples: int = 200,
    calibration_examples: int = 256,
    batch_size: int = 32,
    max_length: int = 64,
    progress: bool = True,
    remote_code: bool = False,
) -> PruneReport:
    """Choose heads from a scores file (a fraction, a count, the best K per layer, or Michel et
    al.'s iterative pruning within ``tolerance``), remove them, optionally repair, measure, save.

    The metric is measured on the first ``eval_examples`` rows of ``eval_split`` when asked
    (``evaluate``), and always with ``iterative`` or ``repair``; repair calibrates on the first
    ``calibration_examples`` training rows. Writes a checkpoint (:func:`prune.checkpoints.load_model`
    reloads it) plus ``prune_report.json`` into ``out``; ``remote_code`` adds the self-contained
    modeling file (``prune.remote_code``, off by default: a security decision of the user).
    """
    import time

    from attribution.core.data import as_spec, iter_batches, load_splits
    from prune.checkpoints import load_model, save_pruned
    from prune.evaluate import evaluate as evaluate_metrics
    from prune.metrics import compute_metrics
    from prune.strategies import check_scores

    started = time.perf_counter()
    for name, value in (("eval_examples", eval_examples), ("score_examples", score_examples),
                        ("calibration_examples", calibration_examples), ("batch_size", batch_size)):
        if value < 1:
            raise HeadpruneError(f"{name} must be a positive integer, got {value}")
    compute_metrics([0], [0], [metric])  # an unknown metric fails before any work
    scores = HeadScores.load(scores_path)
    dense, tokenizer = load_model(model_name, progress=progress)
    check_scores(scores, dense)
    _, _, kept_before = head_counts(dense)
    measured = evaluate or iterative or repair
    splits = load_splits(replace(as_spec(data), max_length=max_length)) if measured else None
    eval_set = None
    if splits is not None:
        if eval_split not in splits:
            raise HeadpruneError(f"no split {eval_split!r} in {as_spec(data).name}")
        eval_set = splits[eval_split].select(range(min(eval_examples, len(splits[eval_split]))))

    def metric_of(m: PreTrainedModel) -> float:
        result = evaluate_metrics(m, tokenizer, eval_set, metrics=[metric], batch_size=64, max_length=max_length)
        return result.metrics[metric]

    metrics: dict[str, Metrics] = {}
    strategy: dict[str, Any]
    history = None
    if iterative:
        heads, history = _iterative(dense, tokenizer, scores, splits, metric_of, tolerance=tolerance, step=step,
                                    min_per_layer=min_per_layer, score_examples=score_examples,
                                    max_length=max_length, progress=progress)
        metrics["dense"] = {metric: history.dense_metric}
        strategy = {"iterative": True, "tolerance": tolerance, "step": step}
    else:
        heads = select_heads(scores, sparsity=sparsity, count=count, keep_per_layer=keep_per_layer,
                             min_per_layer=min_per_layer, present=kept_before)
        chosen = {"sparsity": sparsity, "count": count, "keep_per_layer": keep_per_layer}
        strategy = {k: v for k, v in chosen.items() if v is not None}
    strategy["min_per_layer"] = min_per_layer
    if evaluate and "dense" not in metrics:
        metrics["dense"] = {metric: metric_of(dense)}
    calibration = None
    if repair:
        rows = splits["train"].select(range(min(calibration_examples, len(splits["train"]))))
        calibration = [
            {k: v for k, v in b.items() if k not in ("index", "labels")}
            for b in iter_batches(rows, tokenizer, batch_size=batch_size, max_length=max_length)
        ]
    outcome = prune_and_repair(
        dense,
        heads,
        evaluate=(lambda m: {metric: metric_of(m)}) if measured else None,
        calibration=calibration,
        progress=progress,
    )
    metrics.update(outcome.metrics)
    directory = save_pruned(outcome.model, out, tokenizer, remote_code=remote_code)
    removed, _, kept = head_counts(outcome.model)
    report = PruneReport(
        model=model_name,
        scores=str(scores_path),
        criterion=scores.criterion,
        strategy=strategy,
        removed={layer: sorted(h) for layer, h in outcome.removed.items()},
        kept=kept,
        heads_before=sum(len(k) for k in kept_before),
        heads_after=sum(len(k) for k in kept),
        metrics=metrics,
        repair=outcome.repair.to_dict() if outcome.repair is not None else None,
        iterative=history.to_dict() if history is not None else None,
        seconds=round(time.perf_counter() - started, 2),
    )
    report.save(directory / REPORT_NAME)
    return report


def _iterative(
    dense: PreTrainedModel,
    tokenizer: Any,
    scores: HeadScores,
    splits: Any,
    metric_of: Callable[[PreTrainedModel], float],
    *,
    tolerance: float,
    step: float,
    min_per_layer: int,
    score_examples: int,
    max_length: int,
    progress: bool,
) -> tuple[Heads, Any]:
    """Michel et al.'s iterative pruning, re-scoring the masked model with the scores' criterion
    and options on the first ``score_examples`` validation rows."""
    from attribution.core.data import iter_batches
    from attribution.criteria import head_importance
    from prune.strategies import iterative_pruning

    score_set = splits["validation"].select(range(min(score_examples, len(splits["validation"]))))
    options = dict(scores.provenance.get("options", {}))

    def score_fn(m: PreTrainedModel) -> HeadScores:
        batches = (
            {k: v for k, v in b.items() if k != "index"}
            for b in iter_batches(score_set, tokenizer, batch_size=16, max_length=max_length)
        )
        return head_importance(m, batches, scores.criterion, progress=False, **options)

    result = iterative_pruning(dense, score_fn, metric_of, step=step, tolerance=tolerance,
                               min_per_layer=min_per_layer, progress=progress)
    if not result.heads:
        raise HeadpruneError(f"no head could be removed within tolerance {tolerance} ({result.stopped_because})")
    return result.heads, result


def heal_checkpoint(
    model_name: str,
    out: str | Path,
    *,
    teacher: str = "default",
    data: DataSpec | str = "tweets",
    budget: str | float = "10m",
    max_steps: int | None = None,
    train_examples: int = 12000,
    held_out_examples: int = 500,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Any:
    """Heal a pruned checkpoint by distillation from ``teacher`` (``prune.heal.heal``: KL at a
    temperature plus cross-entropy, the wall-clock ``budget``, early stopping on held-out
    validation rows, never worse than the start) and save it to ``out``; resumable: the state
    is kept in ``out/.heal/`` until the heal finishes. Under ``accelerate launch``/``torchrun``
    every process calls it and heals its shard of each batch; the main process saves. Returns
    the ``HealResult``."""
    import shutil

    from attribution.core import processes
    from attribution.core.data import as_spec, load_splits
    from prune.checkpoints import load_model, save_pruned
    from prune.heal import heal, parse_duration

    seconds = parse_duration(budget)  # a bad budget fails before anything is loaded
    for name, value in (("train_examples", train_examples), ("held_out_examples", held_out_examples)):
        if value < 1:
            raise HeadpruneError(f"{name} must be a positive integer, got {value}")
    student, tokenizer = load_model(model_name, progress=progress)
    dense, _ = load_model(teacher, tokenizer=False, progress=progress)
    splits = load_splits(replace(as_spec(data), max_length=max_length))
    train = splits["train"].select(range(min(train_examples, len(splits["train"]))))
    held_out = splits["validation"].select(range(min(held_out_examples, len(splits["validation"]))))
    state = Path(out) / ".heal"
    result = heal(student, dense, tokenizer, train, held_out, budget_seconds=seconds, max_steps=max_steps,
                  max_length=max_length, seed=seed, checkpoint_dir=state, progress=progress, **options)
    if processes.is_distributed() and not processes.is_main_process():
        processes.barrier()  # every process of a launch heals; the main one saves
        return result
    save_pruned(student, out, tokenizer)  # replaces the directory (and so the resume state) atomically
    result.save(Path(out) / "heal_result.json")
    shutil.rmtree(state, ignore_errors=True)
    processes.barrier()
    return result
