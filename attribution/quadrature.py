"""Quadrature rules for integrated gradients on [0, 1]: scaling factors and their weights.

The definitions match captum's ``approximation_parameters`` so results can be compared with it.
``riemann_right`` with 20 steps is the AttAttr paper's sum (k = 1..m); ``riemann_left`` is the
authors' code (k = 0..m-1); ``gausslegendre`` reaches a given completeness error with far fewer
model evaluations and is what we recommend.
"""

from __future__ import annotations

import numpy as np

from attribution.errors import HeadpruneError

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """``(alphas, weights)``, each of length ``n_steps``, with ``sum(weights) == 1``."""
    if method not in METHODS:
        raise HeadpruneError(f"unknown integration method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(n_steps, int) or n_steps < 1 or (method == "riemann_trapezoid" and n_steps < 2):
        raise HeadpruneError(f"n_steps must be a positive integer (>= 2 for trapezoid), got {n_steps!r}")
    m = n_steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return (0.5 * (nodes + 1)).tolist(), (0.5 * weights).tolist()
    if method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, m)
        weights = np.full(m, 1.0 / (m - 1))
        weights[[0, -1]] *= 0.5
        return alphas.tolist(), weights.tolist()
    offset = {"riemann_right": 1.0, "riemann_left": 0.0, "riemann_middle": 0.5}[method]
    return [(k + offset) / m for k in range(m)], [1.0 / m] * m
