"""Kwon et al.'s budgeted search over heads and neurons: a hand-computed case, brute force on tiny
problems (exact for an additive FLOPs-like cost; the gap reported for a latency-like one), the
budget never exceeded (also for non-monotone costs), constraints, targets, bad input, the record,
and the accuracy-tolerance bisection."""

from __future__ import annotations

import itertools
import json
import logging
import random

import pytest
import torch

from attribution.core.errors import HeadpruneError
from prune.search import SearchPoint, SearchResult, budget_from_target, search, search_tolerance

# --------------------------------------------------------------------------------------------
# Helpers: costs, brute force, the properties every result must have
# --------------------------------------------------------------------------------------------


def additive(base: float, head: float, neuron: float):
    """FLOPs-like: one price per head and one per neuron, the same in every layer (DESIGN.md §5)."""
    return lambda h, n: base + head * sum(h) + neuron * sum(n)


def per_layer_additive(rng: random.Random, layers: int):
    """Additive, but each layer prices its units differently (a knapsack: no optimality claim)."""
    head = [rng.uniform(0.5, 3) for _ in range(layers)]
    neuron = [rng.uniform(0.1, 1) for _ in range(layers)]
    return lambda h, n: 1.0 + sum(a * x for a, x in zip(head, h, strict=True)) + sum(
        b * x for b, x in zip(neuron, n, strict=True)
    )


def latency_like(rng: random.Random):
    """Monotone, non-linear: a sub-layer costs nothing when empty, an overhead when not, is flat
    below a threshold and linear above it (the shape of Kwon et al.'s latency model)."""
    o_a, s_a, t_a = rng.uniform(0.5, 2), rng.uniform(0.5, 2), rng.randint(1, 2)
    o_f, s_f, t_f = rng.uniform(0.5, 2), rng.uniform(0.2, 1), rng.randint(1, 3)

    def cost(h, n):
        attention = sum(0.0 if x == 0 else o_a + s_a * max(x, t_a) for x in h)
        ffn = sum(0.0 if x == 0 else o_f + s_f * max(x, t_f) for x in n)
        return 0.3 + attention + ffn

    return cost


def _full(present, layers, width):
    return [list(range(width)) for _ in range(layers)] if present is None else [list(p) for p in present]


def _subsets(scores, present, minimum):
    """Every subset of the present units meeting the per-layer minimum: (counts, summed score)."""
    layers = len(present)
    units = [(layer, u) for layer in range(layers) for u in present[layer]]
    out = []
    for mask in range(2 ** len(units)):
        chosen = [units[i] for i in range(len(units)) if mask >> i & 1]
        counts = [0] * layers
        for layer, _ in chosen:
            counts[layer] += 1
        if all(counts[layer] >= min(minimum, len(present[layer])) for layer in range(layers)):
            out.append((counts, sum(float(scores[layer, u]) for layer, u in chosen)))
    return out


def brute_force(hs, ns, cost, budget, present_h=None, present_f=None, min_h=0, min_f=0):
    """The largest kept importance over every feasible subset of units (None: nothing fits)."""
    layers = hs.shape[0]
    heads = _subsets(hs, _full(present_h, layers, hs.shape[1]), min_h)
    neurons = _subsets(ns, _full(present_f, layers, ns.shape[1]), min_f)
    best = None
    for (hc, hi), (nc, ni) in itertools.product(heads, neurons):
        if cost(hc, nc) <= budget and (best is None or hi + ni > best):
            best = hi + ni
    return best


def check_result(r, hs, ns, cost, budget, present_h=None, present_f=None, min_h=0, min_f=0):
    """What every search result must satisfy, whatever the cost."""
    layers = hs.shape[0]
    for present, removed, counts, minimum in (
        (_full(present_h, layers, hs.shape[1]), r.removed_heads, r.heads_per_layer, min_h),
        (_full(present_f, layers, ns.shape[1]), r.removed_neurons, r.neurons_per_layer, min_f),
    ):
        assert set(removed) <= set(range(layers))
        kept = []
        for layer in range(layers):
            gone = removed.get(layer, [])
            assert gone != [] or layer not in removed  # no empty lists
            assert gone == sorted(set(gone)) and set(gone) <= set(present[layer])
            kept.append(set(present[layer]) - set(gone))
        assert counts == [len(k) for k in kept]
        assert all(len(kept[layer]) >= min(minimum, len(present[layer])) for layer in range(layers))
    kept_importance = sum(
        float(hs[layer, u]) for layer in range(layers)
        for u in set(_full(present_h, layers, hs.shape[1])[layer]) - set(r.removed_heads.get(layer, []))
    ) + sum(
        float(ns[layer, u]) for layer in range(layers)
        for u in set(_full(present_f, layers, ns.shape[1])[layer]) - set(r.removed_neurons.get(layer, []))
    )
    assert r.importance == pytest.approx(kept_importance, abs=1e-9)
    assert r.cost == cost(r.heads_per_layer, r.neurons_per_layer)
    assert r.cost <= budget and r.budget == budget
    assert r.curve and all(p.cost <= budget for p in r.curve)
    assert max(p.importance for p in r.curve) == r.importance
    assert [p.heads for p in r.curve] == sorted({p.heads for p in r.curve})  # one point per head count


def random_problem(rng: random.Random, layers: int, heads: int, width: int, *, constraints: bool):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    hs = torch.randn(layers, heads, generator=gen, dtype=torch.float64)
    ns = torch.randn(layers, width, generator=gen, dtype=torch.float64)
    if rng.random() < 0.5:  # mostly positive, like Fisher
        hs, ns = hs.abs() + 0.01, ns.abs() + 0.01
    options = {}
    if constraints:
        options["present_heads"] = [[u for u in range(heads) if rng.random() < 0.8] for _ in range(layers)]
        options["present_neurons"] = [[u for u in range(width) if rng.random() < 0.8] for _ in range(layers)]
        options["min_heads_per_layer"] = rng.randint(0, min(1, heads))
        options["min_neurons_per_layer"] = rng.randint(0, min(2, width))
    return hs, ns, options


def budget_between(rng: random.Random, cost, hs, ns, options) -> float:
    """A budget from just below the empty model's cost to just above the full one's."""
    ph = _full(options.get("present_heads"), hs.shape[0], hs.shape[1])
    pf = _full(options.get("present_neurons"), ns.shape[0], ns.shape[1])
    low = cost([0] * hs.shape[0], [0] * ns.shape[0])
    high = cost([len(p) for p in ph], [len(p) for p in pf])
    return rng.uniform(low - 0.1 * (high - low), high + 0.1 * (high - low))


def _constraint_args(options):
    return (
        options.get("present_heads"), options.get("present_neurons"),
        options.get("min_heads_per_layer", 0), options.get("min_neurons_per_layer", 0),
    )


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


def test_hand_computed_example_drops_a_whole_feed_forward_layer():
    hs = torch.tensor([[5.0, 1.0], [4.0, 0.5]])
    ns = torch.tensor([[3.0, 2.0], [0.2, 0.1]])
    cost = additive(0.0, 4.0, 1.0)
    r = search(hs, ns, cost, 10.0)
    # 0 heads: all 4 neurons (5.3, cost 4); 1 head: + all neurons (10.3, cost 8);
    # 2 heads: cost 8 leaves room for the 2 best neurons (14.0, cost 10); 3 heads cost 12 > 10.
    assert r.curve == [SearchPoint(0, 4, pytest.approx(5.3), 4.0), SearchPoint(1, 4, pytest.approx(10.3), 8.0),
                       SearchPoint(2, 2, 14.0, 10.0)]
    assert r.removed_heads == {0: [1], 1: [1]}
    assert r.removed_neurons == {1: [0, 1]}  # layer 1's feed-forward block is gone
    assert (r.heads_per_layer, r.neurons_per_layer) == ([1, 1], [2, 0])
    assert (r.cost, r.budget, r.importance) == (10.0, 10.0, 14.0)
    assert r.dense_cost == 20.0 and r.fraction == 0.5
    assert r.dense_importance == pytest.approx(15.8)
    check_result(r, hs, ns, cost, 10.0)


def test_a_layer_can_lose_every_head():
    hs = torch.tensor([[9.0, 8.0], [0.1, 0.2]])
    ns = torch.ones(2, 3)
    r = search(hs, ns, additive(0.0, 3.0, 1.0), 12.0)
    assert r.removed_heads == {1: [0, 1]} and r.heads_per_layer == [2, 0]
    assert r.neurons_per_layer == [3, 3]
    # one head a layer required: layer 1 keeps its better head (cost 3), then head (0, 1) beats
    # the 3 neurons it displaces; the tied neurons go by layer, so layer 1's feed-forward goes
    r = search(hs, ns, additive(0.0, 3.0, 1.0), 12.0, min_heads_per_layer=1)
    assert r.removed_heads == {1: [0]} and r.heads_per_layer == [2, 1]
    assert r.removed_neurons == {1: [0, 1, 2]} and r.importance == pytest.approx(20.2)


def test_neurons_fill_the_free_room_of_a_flat_latency():
    """The greedy goes on past the first neuron that does not fit: layer 1 is flat from 1 to 2
    neurons, so its second neuron is free although layer 0's next one no longer fits."""
    hs = torch.tensor([[1.0], [1.0]])
    ns = torch.tensor([[8.0, 7.0], [9.0, 1.0]])

    def cost(h, n):
        heads = 100.0 * sum(h)
        return heads + (0 if n[0] == 0 else 2 + 2 * n[0]) + (0 if n[1] == 0 else 2 + 2 * max(n[1], 2))

    r = search(hs, ns, cost, 10.0)
    assert r.removed_neurons == {0: [1]} and r.neurons_per_layer == [1, 2]
    assert (r.cost, r.importance) == (10.0, 18.0) and r.removed_heads == {0: [0], 1: [0]}
    assert r.importance == brute_force(hs, ns, cost, 10.0)


def test_matches_brute_force_for_an_additive_cost():
    """Exact: one price per head and one per neuron make the per-head-count greedy optimal, with
    signed scores, absent units and per-layer minimums."""
    rng = random.Random(0)
    checked = 0
    for _ in range(60):
        layers = rng.choice([1, 2])
        hs, ns, options = random_problem(rng, layers, 2, 3, constraints=rng.random() < 0.6)
        cost = additive(rng.randint(0, 4), rng.randint(1, 6), rng.randint(1, 3))
        budget = budget_between(rng, cost, hs, ns, options)
        args = _constraint_args(options)
        best = brute_force(hs, ns, cost, budget, *args)
        if best is None:
            with pytest.raises(HeadpruneError, match="unreachable"):
                search(hs, ns, cost, budget, **options)
            continue
        r = search(hs, ns, cost, budget, **options)
        check_result(r, hs, ns, cost, budget, *args)
        assert r.importance == pytest.approx(best, abs=1e-9)
        checked += 1
    assert checked >= 40


def test_gap_to_brute_force_for_a_latency_like_cost_is_reported():
    """Not a knapsack the greedy solves exactly: never better than brute force (it would be
    infeasible), always feasible; the gap is printed (``pytest -s``), not asserted."""
    rng = random.Random(1)
    gaps = []
    for _ in range(60):
        hs, ns, options = random_problem(rng, 2, 2, 3, constraints=rng.random() < 0.5)
        cost = latency_like(rng)
        budget = budget_between(rng, cost, hs, ns, options)
        best = brute_force(hs, ns, cost, budget, *_constraint_args(options))
        if best is None:
            continue
        r = search(hs, ns, cost, budget, **options)
        check_result(r, hs, ns, cost, budget, *_constraint_args(options))
        assert r.importance <= best + 1e-9
        gaps.append((best - r.importance) / abs(best) if best else best - r.importance)
    assert len(gaps) >= 30
    worse = [g for g in gaps if g > 1e-9]
    print(
        f"\nlatency-like cost: search optimal on {len(gaps) - len(worse)}/{len(gaps)} tiny problems; "
        f"relative gap to brute force mean {sum(gaps) / len(gaps):.2%}, max {max(gaps):.2%}"
    )


def test_never_exceeds_the_budget():
    rng = random.Random(2)
    for i in range(150):
        layers, heads, width = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 20)
        hs, ns, options = random_problem(rng, layers, heads, width, constraints=rng.random() < 0.5)
        kind = i % 3
        cost = (
            additive(rng.uniform(0, 5), rng.uniform(1, 10), rng.uniform(0.1, 1)) if kind == 0
            else per_layer_additive(rng, layers) if kind == 1
            else latency_like(rng)
        )
        budget = budget_between(rng, cost, hs, ns, options)
        try:
            r = search(hs, ns, cost, budget, **options)
        except HeadpruneError as error:
            floor = cost(
                [min(options.get("min_heads_per_layer", 0), len(p)) for p in _full(options.get("present_heads"),
                                                                                    layers, heads)],
                [min(options.get("min_neurons_per_layer", 0), len(p)) for p in _full(options.get("present_neurons"),
                                                                                      layers, width)],
            )
            assert floor > budget and "unreachable" in str(error)
            continue
        check_result(r, hs, ns, cost, budget, *_constraint_args(options))


def test_never_exceeds_the_budget_even_for_a_non_monotone_cost():
    """The contract only assumes monotonicity for quality; feasibility holds for any cost."""
    rng = random.Random(3)
    for _ in range(40):
        layers, heads, width = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 12)
        hs, ns, options = random_problem(rng, layers, heads, width, constraints=False)
        table: dict = {}
        seed = rng.random()

        def cost(h, n, table=table, seed=seed):
            key = (tuple(h), tuple(n))
            if key not in table:
                table[key] = 0.0 if not any(h) and not any(n) else random.Random(hash((seed, key))).uniform(0, 10)
            return table[key]

        r = search(hs, ns, cost, 5.0)
        check_result(r, hs, ns, cost, 5.0)


def test_full_budget_keeps_every_positive_unit_and_never_a_negative_one():
    hs = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    ns = torch.tensor([[-0.5, 0.3, -0.2], [-1.0, -2.0, -3.0]])
    cost = additive(1.0, 2.0, 1.0)
    r = search(hs, ns, cost, 100.0)
    assert r.removed_heads == {0: [1]}
    assert r.removed_neurons == {0: [0, 2], 1: [0, 1, 2]}
    assert r.importance == pytest.approx(3.8) and r.cost < r.budget
    # a minimum forces the best (least negative) neuron of each layer back in
    r = search(hs, ns, cost, 100.0, min_neurons_per_layer=1)
    assert r.removed_neurons == {0: [0, 2], 1: [1, 2]}
    assert r.importance == pytest.approx(2.8)
    # equal importance: the cheaper candidate wins (a head worth exactly the 2 neurons it displaces)
    r = search(torch.tensor([[5.0, 2.0]]), torch.ones(1, 4), additive(0.0, 3.0, 2.0), 11.0)
    assert [(p.heads, p.importance, p.cost) for p in r.curve] == [(0, 4.0, 8.0), (1, 9.0, 11.0), (2, 9.0, 10.0)]
    assert r.heads_per_layer == [2] and r.neurons_per_layer == [2] and r.cost == 10.0
    # a unit scored 0 adds nothing, so it goes
    r = search(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), cost, 100.0)
    assert r.removed_heads == {0: [1]} and r.removed_neurons == {0: [1]} and r.cost == 4.0


def test_present_units_and_minimums():
    hs = torch.tensor([[0.1, 0.2, 0.3], [5.0, 6.0, 7.0]])
    ns = torch.tensor([[1.0, 0.9, 0.8, 0.7], [2.0, 1.9, 1.8, 1.7]])
    cost = additive(0.0, 2.0, 1.0)
    present_h = [[2], []]  # layer 1 has lost every head already
    present_f = [[0, 3], [1, 2, 3]]
    r = search(hs, ns, cost, 3.0, present_heads=present_h, present_neurons=present_f, min_heads_per_layer=1)
    # the forced head (2 of layer 0) costs 2; one neuron fits: the best present one, (1, 1)
    assert r.removed_heads == {}
    assert r.removed_neurons == {0: [0, 3], 1: [2, 3]}
    assert (r.heads_per_layer, r.neurons_per_layer) == ([1, 0], [0, 1])
    assert r.dense_cost == cost([1, 0], [2, 3])
    check_result(r, hs, ns, cost, 3.0, present_h, present_f, 1, 0)
    with pytest.raises(HeadpruneError, match=r"per-layer minimum \(1 heads, 2 neurons\), costs 6"):
        search(hs, ns, cost, 3.0, present_heads=present_h, present_neurons=present_f,
               min_heads_per_layer=1, min_neurons_per_layer=2)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.ones(2, 2), torch.ones(3, 4)), {}, "2 layers, the neuron scores 3"),
        ((torch.ones(2), torch.ones(2, 4)), {}, "shape"),
        ((torch.tensor([[1.0, float("nan")]]), torch.ones(1, 4)), {}, "NaN"),
        (([[1.0]], torch.ones(1, 4)), {}, "must be a tensor"),
        ((torch.ones(2, 2), torch.ones(2, 4)), {"present_heads": [[0, 2], [1]]}, "head 2 of layer 0 is outside"),
        ((torch.ones(2, 2), torch.ones(2, 4)), {"present_neurons": [[0]]}, "given for 1 layers"),
        ((torch.ones(2, 2), torch.ones(2, 4)), {"present_neurons": [[0, 0], []]}, "twice"),
        ((torch.ones(2, 2), torch.ones(2, 4)), {"min_heads_per_layer": 3}, "min_heads_per_layer must be"),
        ((torch.ones(2, 2), torch.ones(2, 4)), {"min_neurons_per_layer": -1}, "min_neurons_per_layer must be"),
    ],
)
def test_bad_input_is_one_line(args, kwargs, match):
    with pytest.raises(HeadpruneError, match=match) as excinfo:
        search(*args, additive(0, 1, 1), 5.0, **kwargs)
    _one_line(excinfo)


def test_bad_budget_and_cost_are_one_line():
    hs, ns = torch.ones(2, 2), torch.ones(2, 3)
    with pytest.raises(HeadpruneError, match="no heads and no neurons, costs 4") as excinfo:
        search(hs, ns, additive(4, 1, 1), 3.5)
    _one_line(excinfo)
    with pytest.raises(HeadpruneError, match="budget must be a finite number") as excinfo:
        search(hs, ns, additive(0, 1, 1), float("nan"))
    with pytest.raises(HeadpruneError, match="cost function returned nan") as excinfo:
        search(hs, ns, lambda h, n: float("nan"), 3.0)
    _one_line(excinfo)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def test_budget_from_target():
    flops = additive(10.0, 5.0, 1.0)  # dense with 2x2 heads, 2x3 neurons: 10 + 20 + 6 = 36
    assert budget_from_target(flops, 0.5, [2, 2], [3, 3]) == 18.0
    assert budget_from_target(flops, 0.75, [2, 2], [3, 3], target="latency") == 27.0
    # the budget is of the model given (e.g. already pruned), not of some other dense model
    assert budget_from_target(flops, 0.5, [1, 0], [3, 3]) == pytest.approx(10.5)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, True, "0.5", float("nan")])
def test_fractions_outside_the_open_unit_interval_are_one_line_errors(fraction):
    with pytest.raises(HeadpruneError, match="strictly between 0 and 1") as excinfo:
        budget_from_target(additive(1, 1, 1), fraction, [2], [2], target="latency")
    assert "latency" in _one_line(excinfo)


def test_a_target_reachable_only_by_removing_everything_names_the_minimum():
    latency = additive(10.0, 5.0, 1.0)  # empty model 10 of 36 dense: minimum reachable 0.2778
    with pytest.raises(HeadpruneError, match=r"only by removing every unit.*minimum reachable is a fraction of 0\.2778"
                       ) as excinfo:
        budget_from_target(latency, 0.25, [2, 2], [3, 3], target="latency")
    _one_line(excinfo)
    with pytest.raises(HeadpruneError, match="0.2778"):  # exactly the empty model: still nothing left
        budget_from_target(additive(10.0, 5.0, 1.0), 10 / 36, [2, 2], [3, 3])
    budget = budget_from_target(latency, 0.28, [2, 2], [3, 3], target="latency")
    assert search(torch.ones(2, 2), torch.ones(2, 3), latency, budget).cost <= budget
    # with a per-layer minimum, the smallest model is the minimum one: 10 + 2*5 + 2*1 = 22
    with pytest.raises(HeadpruneError, match="out of reach keeping 1 heads and 1 neurons a layer: that model already "
                       "costs 22 of 36"):
        budget_from_target(latency, 0.6, [2, 2], [3, 3], min_heads_per_layer=1, min_neurons_per_layer=1)
    with pytest.raises(HeadpruneError, match="target must be one of flops, latency"):
        budget_from_target(latency, 0.6, [2, 2], [3, 3], target="params")


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def test_result_save_load_round_trip(tmp_path):
    rng = random.Random(4)
    hs, ns, options = random_problem(rng, 3, 4, 10, constraints=True)
    cost = latency_like(rng)
    options["min_heads_per_layer"] = 0
    r = search(hs, ns, cost, cost([2, 2, 2], [5, 5, 5]), **options)
    assert r.removed_heads and r.removed_neurons
    path = r.save(tmp_path / "search.json")
    data = json.loads(path.read_text())
    assert data["format"] == "headprune.SearchResult" and data["version"] == 1
    back = SearchResult.load(path)
    assert back == r
    assert all(isinstance(k, int) for k in back.removed_heads) and isinstance(back.curve[0], SearchPoint)
    (tmp_path / "bad.json").write_text(json.dumps({**data, "curve": 3, "extra": 1}))
    with pytest.raises(HeadpruneError, match="unknown key 'extra'"):
        SearchResult.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------
# The accuracy-tolerance target
# --------------------------------------------------------------------------------------------

HS = torch.rand(3, 4, generator=torch.Generator().manual_seed(5)) + 0.1
NS = torch.rand(3, 12, generator=torch.Generator().manual_seed(6)) + 0.1
FLOPS = additive(2.0, 3.0, 0.5)  # empty model: 2 of 56 dense


def make_result(fraction: float) -> SearchResult:
    return search(HS, NS, FLOPS, budget_from_target(FLOPS, fraction, [4] * 3, [12] * 3))


def boundary_metric(boundary: float, dense: float = 0.9):
    """A metric that falls one-for-one as the budget fraction drops below ``boundary + 0.05``."""
    return lambda r: dense - max(0.0, boundary + 0.05 - r.budget / r.dense_cost)


def test_tolerance_bisection_finds_the_boundary():
    result, history = search_tolerance(boundary_metric(0.57), 0.9, 0.05, make_result, steps=8)
    fraction = result.budget / result.dense_cost
    assert 0.57 - 1e-9 <= fraction <= 0.57 + 0.7 / 2**8
    assert len(history) == 1 + 8 and history[0].fraction == 0.3 and not history[0].accepted
    assert [s.accepted for s in history] == [s.metric >= 0.85 - 1e-12 for s in history]
    assert min(s.fraction for s in history if s.accepted) == pytest.approx(fraction)
    assert result.cost <= result.budget


def test_tolerance_accepting_low_or_nothing():
    result, history = search_tolerance(lambda r: 0.9, 0.9, 0.0, make_result, low=0.4)
    assert len(history) == 1 and result.budget / result.dense_cost == pytest.approx(0.4)
    with pytest.raises(HeadpruneError, match=r"no budget fraction in \[0.3, 0.8\].*largest probed, 0.8000") as excinfo:
        search_tolerance(lambda r: 0.5, 0.9, 0.01, make_result, high=0.8)
    _one_line(excinfo)
    with pytest.raises(HeadpruneError, match=r"no budget fraction in \[0.3, 1\)"):
        search_tolerance(lambda r: 0.5, 0.9, 0.01, make_result)


def test_tolerance_counts_unbuildable_fractions_as_rejected():
    expensive = additive(30.0, 3.0, 0.5)  # empty model: 30 of 84 dense (0.357)

    def build(fraction):
        return search(HS, NS, expensive, budget_from_target(expensive, fraction, [4] * 3, [12] * 3))

    result, history = search_tolerance(boundary_metric(0.6), 0.9, 0.05, build, low=0.2, steps=7)
    assert history[0].error and "minimum reachable" in history[0].error and history[0].metric is None
    assert 0.6 - 1e-9 <= result.budget / result.dense_cost <= 0.6 + 0.8 / 2**7
    with pytest.raises(HeadpruneError, match="minimum reachable"):  # nothing buildable: that error
        search_tolerance(lambda r: 0.9, 0.9, 0.05, build, low=0.1, high=0.3)


def test_tolerance_warns_when_the_metric_is_not_monotone(caplog):
    def bumpy(r):
        fraction = r.budget / r.dense_cost
        return 0.9 if fraction >= 0.6 else 0.8 if fraction < 0.4 else 0.7

    with caplog.at_level(logging.WARNING, logger="headprune"):
        result, history = search_tolerance(bumpy, 0.9, 0.01, make_result, steps=6)
    assert bumpy(result) == 0.9  # whatever it returns was measured within tolerance
    assert [round(s.fraction, 4) for s in history[:3]] == [0.3, 0.65, 0.475]
    assert "0.8000 at fraction 0.3000 but 0.7000 at the larger 0.4750" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headprune"):
        search_tolerance(boundary_metric(0.57), 0.9, 0.05, make_result)
    assert "not monotone" not in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"low": 0.5, "high": 0.5}, "0 < low < high <= 1"),
        ({"low": 0.0}, "0 < low < high <= 1"),
        ({"high": 1.2}, "0 < low < high <= 1"),
        ({"steps": -1}, "steps must be"),
    ],
)
def test_tolerance_bad_arguments(kwargs, match):
    with pytest.raises(HeadpruneError, match=match):
        search_tolerance(lambda r: 1.0, 0.9, 0.01, make_result, **kwargs)
    with pytest.raises(HeadpruneError, match="tolerance must be >= 0"):
        search_tolerance(lambda r: 1.0, 0.9, -0.01, make_result)
