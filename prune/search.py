"""Which attention heads and feed-forward neurons to keep under a cost budget: the global mask
search of Kwon et al. (NeurIPS 2022, "A Fast Post-Training Pruning Framework for Transformers").

Everything here works on plain tensors and a cost callable, not on a model:

- ``search``: importances of heads ``[L, H]`` and neurons ``[L, F]`` (higher = keep, the same
  currency for both, e.g. Fisher of the masks), a ``cost(heads_per_layer, neurons_per_layer)`` of
  the *kept* counts (multiply-adds, or a fitted latency model) and a budget in the cost's units.
  For every number of kept heads the best heads are taken globally, the rest of the budget is
  filled with the best neurons, and the candidate keeping the most importance wins.
- ``budget_from_target``: the issue's targets (a fraction of multiply-adds, a fraction of latency)
  as a budget, with one-line errors for a fraction outside (0, 1) or one no model reaches.
- ``search_tolerance``: the accuracy target: the smallest budget fraction whose model stays within
  ``tolerance`` of the dense metric, by bisection.

Decisions the paper leaves open (or that differ from its code):

- **Objective**: the sum of the kept units' scores; heads and neurons are compared only through
  it, so their exchange rate is whatever the cost model charges for each.
- **Negative scores** (signed criteria such as Taylor without the absolute value, or integrated
  gradients): a unit whose score is <= 0 would not raise the sum, so the search never keeps one
  voluntarily. Neurons with a score <= 0 are never used to fill the budget, and a head count that
  only adds such heads ties or loses (ties go to the cheaper candidate). Such units are kept only
  when ``min_*_per_layer`` requires them. The result may then cost less than the budget; pass
  ``scores.clamp(min=0) + eps`` to fill it regardless. This makes the search exactly optimal for
  an additive cost with one price per head and one per neuron (FLOPs; DESIGN.md §5), which the
  tests check against brute force.
- **Neurons for a given head set**: the greedy rule "add the best-scored neuron that still fits".
  The cost depends only on the counts per layer and is assumed monotone (non-decreasing in every
  count), so that greedy first takes the longest prefix of the global neuron ranking that fits,
  found by binary search; the layer of the first neuron that does not fit is then closed (its next
  neuron never fits again: the other counts only grow) and the greedy goes on along the global
  ranking over the open layers, again by binary search. At most L + 1 binary searches, so
  O(L log N) cost calls per head count, and the same neurons as adding them one at a time. For an
  additive cost this is the paper's "fill with the top neurons"; for a non-linear latency model
  (flat below a threshold) it also uses the free room of the flat parts, but it is not guaranteed
  optimal there (a knapsack problem); the tests report the gap to brute force.
- **Heads**: for each count n, the n best heads globally (after the ones the per-layer minimum
  forces). Counts are tried upwards and stop at the first whose heads alone (with the forced
  neurons) exceed the budget: with a monotone cost no larger count fits either.
- **Ties** in the ranking go to the lower layer, then the lower index; between candidates of equal
  importance the cheaper one wins, then the one with fewer heads.
- **Whole sub-layers** may go: a layer can end with 0 heads or 0 neurons unless
  ``min_heads_per_layer`` / ``min_neurons_per_layer`` say otherwise. A layer with fewer present
  units than the minimum keeps all of them.
- **Absent units** (``present_heads`` / ``present_neurons``, for an already pruned model) are
  neither kept nor listed as removed; the cost of the model as given is ``dense_cost``.
- Every configuration the search returns had its cost evaluated and found ``<= budget`` (exact
  comparison): even a non-monotone cost cannot make it exceed the budget, only search worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

import torch

from attribution.core.errors import HeadpruneError
from attribution.core.io import Record
from attribution.core.log import get_logger

Units = dict[int, list[int]]
CostFn = Callable[[list[int], list[int]], float]

log = get_logger("search")

# metrics that are ratios of small integers (accuracy of N rows) compare with this slack
METRIC_EPS = 1e-12
# the cost targets: name -> what the fraction is of
TARGETS = {"flops": "multiply-adds", "latency": "latency"}


@dataclass
class SearchPoint:
    """One candidate of the search: the best configuration with ``heads`` heads kept in total
    (``neurons`` kept neurons, their summed ``importance``, its ``cost``). Stored inside a
    ``SearchResult``; the curve of these is what to plot (kept heads -> best importance)."""

    heads: int
    neurons: int
    importance: float
    cost: float


@dataclass
class SearchResult(Record):
    """Outcome of ``search``: units to remove (original indices, ``{layer: [index, ...]}``, layers
    with nothing to remove left out), kept counts per layer, the cost of the kept model, the budget,
    the kept importance, and every feasible candidate (``curve``). ``dense_cost`` and
    ``dense_importance`` are those of the model as given (all present units kept). A
    ``headprune.SearchResult`` record; layer keys are strings in JSON, integers after loading."""

    FORMAT: ClassVar[str] = "headprune.SearchResult"
    VERSION: ClassVar[int] = 1

    removed_heads: Units
    removed_neurons: Units
    heads_per_layer: list[int]
    neurons_per_layer: list[int]
    cost: float
    budget: float
    importance: float
    dense_cost: float
    dense_importance: float
    curve: list[SearchPoint] = field(default_factory=list)
    cost_evaluations: int = 0

    @property
    def fraction(self) -> float:
        """Cost of the kept model as a fraction of the model as given."""
        return self.cost / self.dense_cost if self.dense_cost else float("nan")


@dataclass
class ToleranceStep:
    """One probe of ``search_tolerance``: the budget ``fraction`` tried, the metric of its model
    and whether it stayed within tolerance (``error`` when no model could be built for it)."""

    fraction: float
    metric: float | None
    accepted: bool
    cost: float | None = None
    budget: float | None = None
    error: str = ""


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_scores(scores: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise HeadpruneError(f"{what} scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise HeadpruneError(f"{what} scores must have shape [layers, {what}s], got {list(scores.shape)}")
    scores = scores.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise HeadpruneError(f"the {what} scores contain NaN or infinite values")
    return scores


def _check_present(present: Sequence[Sequence[int]] | None, layers: int, width: int, what: str) -> list[list[int]]:
    if present is None:
        return [list(range(width)) for _ in range(layers)]
    if len(present) != layers:
        raise HeadpruneError(f"present {what}s given for {len(present)} layers, the scores have {layers}")
    out = []
    for layer, units in enumerate(present):
        units = [int(u) for u in units]
        bad = [u for u in units if not 0 <= u < width]
        if bad:
            raise HeadpruneError(f"present {what} {bad[0]} of layer {layer} is outside 0..{width - 1}")
        if len(set(units)) != len(units):
            raise HeadpruneError(f"present {what}s of layer {layer} list a unit twice")
        out.append(sorted(units))
    return out


def _check_min(value: int, width: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= width:
        raise HeadpruneError(f"{name} must be an integer in 0..{width}, got {value!r}")
    return value


def _check_number(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HeadpruneError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class _Cost:
    """The user's cost callable, counted and checked (a finite number for every call)."""

    def __init__(self, cost: CostFn) -> None:
        if not callable(cost):
            raise HeadpruneError(f"cost must be a callable (heads_per_layer, neurons_per_layer) -> float, got {cost!r}")
        self.cost = cost
        self.calls = 0

    def __call__(self, heads: list[int], neurons: list[int]) -> float:
        self.calls += 1
        value = self.cost(list(heads), list(neurons))
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HeadpruneError(f"the cost function returned {value!r}, not a number") from None
        if not math.isfinite(value):
            raise HeadpruneError(f"the cost function returned {value} for heads {heads}, neurons {neurons}")
        return value


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


def _rank(scores: torch.Tensor, present: list[list[int]], minimum: int) -> tuple[list[list[int]], list[tuple]]:
    """The units every layer must keep (its ``minimum`` best present ones) and the others ranked
    globally as ``(score, layer, index)``: score descending, then layer, then index."""
    values = scores.tolist()
    forced: list[list[int]] = []
    rest: list[tuple[float, int, int]] = []
    for layer, units in enumerate(present):
        row = values[layer]
        order = sorted(units, key=lambda u, row=row: (-row[u], u))
        forced.append(order[:minimum])
        rest += [(row[u], layer, u) for u in order[minimum:]]
    rest.sort(key=lambda item: (-item[0], item[1], item[2]))
    return forced, rest


def _per_layer(rest: list[tuple[float, int, int]], layers: int) -> tuple[list[list[int]], list[list[float]]]:
    """``rest`` split by layer (order kept): the units, and the cumulative sums of their scores."""
    units: list[list[int]] = [[] for _ in range(layers)]
    scores: list[list[float]] = [[] for _ in range(layers)]
    for score, layer, unit in rest:
        units[layer].append(unit)
        scores[layer].append(score)
    cums = [[0.0, *torch.tensor(s, dtype=torch.float64).cumsum(0).tolist()] for s in scores]
    return units, cums


def _total(scores: torch.Tensor, units: list[list[int]]) -> float:
    """Summed scores of ``units`` (per layer, original indices)."""
    values = scores.tolist()
    return math.fsum(values[layer][u] for layer, us in enumerate(units) for u in us)


def _kept(forced: list[list[int]], order: list[list[int]], counts: list[int]) -> list[set[int]]:
    """Per layer, the forced units and the first ``count - forced`` of that layer's order."""
    return [set(f) | set(o[: c - len(f)]) for f, o, c in zip(forced, order, counts, strict=True)]


def _removed(present: list[list[int]], kept: list[set[int]]) -> Units:
    out = {layer: [u for u in units if u not in kept[layer]] for layer, units in enumerate(present)}
    return {layer: units for layer, units in out.items() if units}


def search(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    cost: CostFn,
    budget: float,
    *,
    present_heads: Sequence[Sequence[int]] | None = None,
    present_neurons: Sequence[Sequence[int]] | None = None,
    min_heads_per_layer: int = 0,
    min_neurons_per_layer: int = 0,
) -> SearchResult:
    """Kwon et al.'s global search for the heads and neurons to keep within ``budget``.

    Args:
        head_scores: ``[L, H]`` importances of the heads (higher = keep), original indices.
        neuron_scores: ``[L, F]`` importances of the feed-forward neurons, in the same currency.
        cost: ``cost(heads_per_layer, neurons_per_layer) -> float`` of the model keeping those
            counts, non-decreasing in every count, e.g. ``lambda h, n: flops(shape, h, n, seq_len)``
            or a latency model's ``predict``.
        budget: the most ``cost`` may be, in its units.
        present_heads, present_neurons: per layer, the units still in the model (default: all).
        min_heads_per_layer, min_neurons_per_layer: never keep fewer per layer (0: a whole
            sub-layer may go).

    Returns a ``SearchResult``; its cost is ``<= budget``. A budget below the cost of the smallest
    model the constraints allow raises a one-line ``HeadpruneError`` naming that cost. See the
    module docstring for the decisions (negative scores, ties, the neuron greedy).
    """
    heads_t = _check_scores(head_scores, "head")
    neurons_t = _check_scores(neuron_scores, "neuron")
    layers, width_h = heads_t.shape
    if neurons_t.shape[0] != layers:
        raise HeadpruneError(f"the head scores have {layers} layers, the neuron scores {neurons_t.shape[0]}")
    width_f = neurons_t.shape[1]
    budget = _check_number(budget, "budget")
    present_h = _check_present(present_heads, layers, width_h, "head")
    present_f = _check_present(present_neurons, layers, width_f, "neuron")
    min_h = _check_min(min_heads_per_layer, width_h, "min_heads_per_layer")
    min_f = _check_min(min_neurons_per_layer, width_f, "min_neurons_per_layer")
    cost_fn = _Cost(cost)

    forced_h, rest_h = _rank(heads_t, present_h, min_h)
    forced_f, rest_f = _rank(neurons_t, present_f, min_f)
    base_h = [len(f) for f in forced_h]
    base_f = [len(f) for f in forced_f]
    imp_forced = _total(heads_t, forced_h) + _total(neurons_t, forced_f)
    dense_importance = _total(heads_t, present_h) + _total(neurons_t, present_f)
    dense_cost = cost_fn([len(p) for p in present_h], [len(p) for p in present_f])

    floor = cost_fn(base_h, base_f)
    if floor > budget:
        smallest = (
            "no heads and no neurons"
            if not any(base_h) and not any(base_f)
            else f"the per-layer minimum ({min_h} heads, {min_f} neurons)"
        )
        raise HeadpruneError(
            f"budget {budget:.6g} is unreachable: the smallest model allowed, with {smallest}, costs {floor:.6g}"
        )

    # neurons that may fill the budget: positive scores only, in global order; within a layer the
    # greedy always keeps a prefix of that layer's order, so counts per layer say which neurons
    fill = [item for item in rest_f if item[0] > 0]
    n_fill = len(fill)
    neuron_order, neuron_cum = _per_layer(fill, layers)
    head_order, head_cum = _per_layer(rest_h, layers)
    prefix_t = torch.zeros(n_fill + 1, layers, dtype=torch.long)  # prefix[k][l]: layer l's among fill[:k]
    if n_fill:
        prefix_t[1:] = torch.nn.functional.one_hot(torch.tensor([layer for _, layer, _ in fill]), layers).cumsum(0)
    prefix: list[list[int]] = prefix_t.tolist()

    def fill_neurons(heads: list[int], cost_empty: float) -> tuple[list[int], float]:
        """The greedy "best-scored neuron that still fits" for one head configuration, as rounds of
        binary search: the longest run of the global order (over layers not yet blocked) that
        fits, then the layer of the first neuron that does not fit is blocked for good."""
        counts, current = list(base_f), cost_empty
        blocked = [False] * layers
        p = 0  # fill[:p] has been decided
        while p < n_fill:
            start = prefix[p]

            def at(q: int, start: list[int] = start, counts: list[int] = counts) -> list[int]:
                row = prefix[q]
                return [c if blocked[i] else c + row[i] - start[i] for i, c in enumerate(counts)]

            if at(n_fill) == counts:
                break  # nothing left in the open layers
            top = cost_fn(heads, at(n_fill))
            if top <= budget:
                counts, current = at(n_fill), top
                break
            lo, hi = p, n_fill  # invariant: at(lo) fits, at(hi) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                value = cost_fn(heads, at(mid))
                if value <= budget:
                    lo, current = mid, value
                else:
                    hi = mid
            counts = at(lo)
            blocked[fill[lo][1]] = True  # fill[lo] is the first that does not fit: its layer is done
            p = lo + 1
        return counts, current

    def importance_of(heads: list[int], neurons: list[int]) -> float:
        kept_heads = sum(head_cum[i][h - b] for i, (h, b) in enumerate(zip(heads, base_h, strict=True)))
        kept_neurons = sum(neuron_cum[i][n - b] for i, (n, b) in enumerate(zip(neurons, base_f, strict=True)))
        return imp_forced + kept_heads + kept_neurons

    curve: list[SearchPoint] = []
    best: tuple[float, float, list[int], list[int]] | None = None  # importance, cost, head and neuron counts
    heads = list(base_h)
    for n in range(len(rest_h) + 1):
        if n:
            heads[rest_h[n - 1][1]] += 1
        cost_empty = floor if n == 0 else cost_fn(heads, base_f)
        if cost_empty > budget:
            break  # these heads alone do not fit, so no larger head count does
        counts, value = fill_neurons(heads, cost_empty)
        importance = importance_of(heads, counts)
        curve.append(SearchPoint(sum(heads), sum(counts), importance, value))
        if best is None or importance > best[0] or (importance == best[0] and value < best[1]):
            best = (importance, value, list(heads), counts)
    assert best is not None  # no heads beyond the forced ones always fit: floor <= budget
    importance, value, heads_kept, neurons_kept = best

    result = SearchResult(
        removed_heads=_removed(present_h, _kept(forced_h, head_order, heads_kept)),
        removed_neurons=_removed(present_f, _kept(forced_f, neuron_order, neurons_kept)),
        heads_per_layer=heads_kept,
        neurons_per_layer=neurons_kept,
        cost=value,
        budget=budget,
        importance=importance,
        dense_cost=dense_cost,
        dense_importance=dense_importance,
        curve=curve,
        cost_evaluations=cost_fn.calls,
    )
    log.debug(
        "search: %d heads, %d neurons kept; cost %.6g of budget %.6g (%.1f%% of dense), importance %.6g of %.6g; "
        "%d candidates, %d cost calls",
        sum(heads_kept), sum(neurons_kept), value, budget, 100 * result.fraction, importance, dense_importance,
        len(curve), cost_fn.calls,
    )
    return result


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def budget_from_target(
    cost: CostFn,
    fraction: float,
    heads_per_layer: Sequence[int],
    neurons_per_layer: Sequence[int],
    *,
    target: str = "flops",
    min_heads_per_layer: int = 0,
    min_neurons_per_layer: int = 0,
) -> float:
    """The budget of a target stated as a fraction of the dense model's cost.

    ``target`` is ``"flops"`` (``cost`` counts multiply-adds) or ``"latency"`` (``cost`` is a
    latency model's prediction); either way the budget is ``fraction * cost(heads_per_layer,
    neurons_per_layer)``, the counts of the reference model (the dense one, or the model as
    given). One-line ``HeadpruneError`` when ``fraction`` is not strictly between 0 and 1, or
    when the budget is reachable only by removing every unit (the per-layer minimum, when given):
    the message names the smallest fraction any model reaches.
    """
    if target not in TARGETS:
        raise HeadpruneError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    what = TARGETS[target]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise HeadpruneError(
            f"a {target} target must be a fraction strictly between 0 and 1 (of the dense model's {what}), "
            f"got {fraction!r}"
        )
    heads = [int(h) for h in heads_per_layer]
    neurons = [int(f) for f in neurons_per_layer]
    if len(heads) != len(neurons) or not heads:
        raise HeadpruneError(f"heads_per_layer ({len(heads)} layers) and neurons_per_layer ({len(neurons)}) differ")
    cost_fn = _Cost(cost)
    dense = cost_fn(heads, neurons)
    if dense <= 0:
        raise HeadpruneError(f"the dense model's {what} is {dense:.6g}: a fraction of it is no budget")
    min_h = _check_min(min_heads_per_layer, max(heads), "min_heads_per_layer")
    min_f = _check_min(min_neurons_per_layer, max(neurons), "min_neurons_per_layer")
    floor_counts = [min(min_h, h) for h in heads], [min(min_f, f) for f in neurons]
    floor = cost_fn(*floor_counts)
    budget = fraction * dense
    if budget <= floor:
        problem = (
            "is reachable only by removing every unit: the model with no heads and no neurons"
            if not (min_h or min_f)
            else f"is out of reach keeping {min_h} heads and {min_f} neurons a layer: that model"
        )
        raise HeadpruneError(
            f"a {target} target of {fraction:g} {problem} already costs {floor:.6g} of {dense:.6g}, "
            f"so the minimum reachable is a fraction of {floor / dense:.4g}"
        )
    return budget


def search_tolerance(
    evaluate: Callable[[SearchResult], float],
    dense_metric: float,
    tolerance: float,
    make_result: Callable[[float], SearchResult],
    *,
    low: float = 0.3,
    high: float = 1.0,
    steps: int = 6,
) -> tuple[SearchResult, list[ToleranceStep]]:
    """The accuracy-tolerance target: the most compression whose metric stays within ``tolerance``.

    ``make_result(fraction)`` runs the search at that budget fraction (e.g. ``search(..., budget=
    budget_from_target(cost, fraction, ...))``) and ``evaluate(result)`` measures the pruned model
    (higher = better; accuracy). A fraction is accepted when its metric is ``>= dense_metric -
    tolerance`` (an absolute drop, like the recipes' ``max_drop``: 0.01 is one accuracy point).

    Bisection over the budget fraction in ``[low, high]``: ``low`` is tried first (accepted: it is
    the answer); ``high`` is tried when below 1 (rejected: error), and 1.0 is the dense model,
    accepted without evaluation. Then ``steps`` midpoints between the largest rejected and the
    smallest accepted fraction; the answer is within ``(high - low) / 2**steps`` of the boundary,
    after ``steps + 1`` (or ``+ 2``) evaluations. A fraction whose model cannot be built
    (``make_result`` raises ``HeadpruneError``, e.g. a budget below the empty model's cost)
    counts as rejected; if no fraction could be built at all, that error is raised.

    Monotonicity is assumed: the metric does not rise as the budget shrinks. When it does (noise
    of a small evaluation set, a repair that helps more at some budgets), the bisection still
    returns only a result it measured within tolerance, the smallest accepted fraction it probed,
    but a smaller acceptable one may lie in an interval it discarded (the bisection never looks
    below an accepted fraction or above a rejected one, so it cannot see such a violation); a
    warning is logged when the probes show the metric rising as the budget shrinks. When no
    fraction is accepted, a one-line ``HeadpruneError`` says so. Returns the result and the probes
    in order.
    """
    dense_metric = _check_number(dense_metric, "dense_metric")
    tolerance = _check_number(tolerance, "tolerance")
    if tolerance < 0:
        raise HeadpruneError(f"tolerance must be >= 0, got {tolerance!r}")
    low, high = _check_number(low, "low"), _check_number(high, "high")
    if not 0 < low < high <= 1:
        raise HeadpruneError(f"need 0 < low < high <= 1 for the budget fractions, got low={low:g}, high={high:g}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise HeadpruneError(f"steps must be a non-negative integer, got {steps!r}")
    floor = dense_metric - tolerance
    history: list[ToleranceStep] = []
    errors: list[HeadpruneError] = []

    def probe(fraction: float) -> SearchResult | None:
        try:
            result = make_result(fraction)
        except HeadpruneError as error:
            errors.append(error)
            history.append(ToleranceStep(fraction, None, False, error=str(error)))
            log.info("tolerance search: fraction %.4f: no model (%s)", fraction, error)
            return None
        metric = float(evaluate(result))
        ok = math.isfinite(metric) and metric >= floor - METRIC_EPS
        history.append(ToleranceStep(fraction, metric, ok, result.cost, result.budget))
        log.info(
            "tolerance search: fraction %.4f -> metric %.4f (floor %.4f): %s",
            fraction, metric, floor, "accepted" if ok else "rejected",
        )
        return result if ok else None

    best: SearchResult | None = None
    hi = high
    if high < 1:
        best = probe(high)
        if best is None:
            _fail(history, errors, low, high, tolerance, dense_metric)
    found = probe(low)
    if found is not None:
        best = found
    else:
        lo = low
        for _ in range(steps):
            mid = (lo + hi) / 2
            found = probe(mid)
            if found is not None:
                best, hi = found, mid
            else:
                lo = mid
    if best is None:
        _fail(history, errors, low, high, tolerance, dense_metric)
    _warn_if_not_monotone(history)
    return best, history


def _warn_if_not_monotone(history: list[ToleranceStep]) -> None:
    """Bisection never probes below an accepted fraction or above a rejected one, so a violation
    that crosses the floor cannot show in its history; a metric that rises as the budget shrinks
    can (the largest such rise is logged)."""
    measured = sorted((s.fraction, s.metric) for s in history if s.metric is not None and math.isfinite(s.metric))
    worst = None
    for i, (f_low, m_low) in enumerate(measured):
        for f_high, m_high in measured[i + 1 :]:
            if m_low - m_high > METRIC_EPS and (worst is None or m_low - m_high > worst[0]):
                worst = (m_low - m_high, f_low, m_low, f_high, m_high)
    if worst is not None:
        _, f_low, m_low, f_high, m_high = worst
        log.warning(
            "the metric is not monotone in the budget: %.4f at fraction %.4f but %.4f at the larger %.4f; "
            "the bisection assumes it is, so a smaller fraction within tolerance may have been skipped",
            m_low, f_low, m_high, f_high,
        )


def _fail(
    history: list[ToleranceStep], errors: list[HeadpruneError], low: float, high: float, tolerance: float, dense: float
) -> NoReturn:
    measured = [s for s in history if s.metric is not None]
    if not measured and errors:
        raise errors[0]
    top = max(measured, key=lambda s: s.fraction)
    span = f"[{low:g}, {high:g}{')' if high == 1 else ']'}"
    raise HeadpruneError(
        f"no budget fraction in {span} keeps the metric within {tolerance:g} of dense ({dense:.4f}): "
        f"the largest probed, {top.fraction:.4f}, gave {top.metric:.4f}"
    )
