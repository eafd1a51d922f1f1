"""Quadrature rules for integrated gradients on [0, 1]: scaling factors and their weights.

The definitions match captum's ``approximation_parameters`` so results can be compared with it.
``riemann_right`` with 20 steps is the AttAttr paper's sum (k = 1..m); ``riemann_left`` is the
authors' code (k = 0..m-1); ``gausslegendre`` reaches a given completeness error with far fewer
model evaluations. ``gaussradau`` (ours, not in captum) is Gauss-Radau with the fixed node at
alpha = 1: exact for polynomials of degree 2m - 2 (Gauss-Legendre: 2m - 1), and its node at 1, the
unscaled model, costs AttAttr one backward pass for all layers together instead of a pass per
layer, so m Radau nodes cost about as much as m - 1 Gauss-Legendre nodes.
"""

from __future__ import annotations

import numpy as np

from attribution.core.errors import HeadpruneError

INTEGRATIONS = (
    "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre", "gaussradau"
)
METHODS = INTEGRATIONS  # the former name, still imported by code outside the quadrature's callers


def quadrature(integration: str, n_steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)`` of the rule ``integration``, each of length ``n_steps``, with
    ``sum(weights) == 1``."""
    if integration not in INTEGRATIONS:
        raise HeadpruneError(
            f"unknown integration method {integration!r}; choose one of {', '.join(INTEGRATIONS)}"
        )
    if not isinstance(n_steps, int) or n_steps < 1 or (integration == "riemann_trapezoid" and n_steps < 2):
        raise HeadpruneError(f"n_steps must be a positive integer (>= 2 for trapezoid), got {n_steps!r}")
    m = n_steps
    if integration == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return (0.5 * (nodes + 1)).tolist(), (0.5 * weights).tolist()
    if integration == "gaussradau":
        return _gauss_radau_right(m)
    if integration == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, m)
        weights = np.full(m, 1.0 / (m - 1))
        weights[[0, -1]] *= 0.5
        return alphas.tolist(), weights.tolist()
    offset = {"riemann_right": 1.0, "riemann_left": 0.0, "riemann_middle": 0.5}[integration]
    return [(k + offset) / m for k in range(m)], [1.0 / m] * m


def _gauss_radau_right(m: int) -> tuple[list[float], list[float]]:
    """Gauss-Radau on [0, 1] with the node at 1 fixed, ascending (so alpha = 1 is exactly last).

    On [-1, 1] with the fixed node at -1, the free nodes are the roots of
    ``(P_{m-1}(x) + P_m(x)) / (1 + x)``, weighted ``(1 - x) / (m P_{m-1}(x))^2``, the fixed node
    ``2 / m^2`` (Abramowitz & Stegun 25.4.31); mirrored and mapped to [0, 1] here.
    """
    if m == 1:
        return [1.0], [1.0]
    legendre = np.polynomial.legendre
    both = np.zeros(m + 1)
    both[m - 1] = both[m] = 1.0
    roots = np.sort(legendre.legroots(both))[1:]  # the smallest root is the fixed node -1
    previous = legendre.legval(roots, np.eye(m)[m - 1])  # P_{m-1} at the free nodes
    free_weights = (1.0 - roots) / (m * previous) ** 2
    alphas = np.concatenate([(1.0 - roots[::-1]) / 2.0, [1.0]])  # x -> -x, then [-1, 1] -> [0, 1]
    weights = np.concatenate([free_weights[::-1] / 2.0, [1.0 / m**2]])
    return alphas.tolist(), weights.tolist()
