"""Classification metrics computed locally (``evaluate.load`` would need the hub).

Every function takes ``predictions`` as class ids [N] or scores/logits [N, C] (argmax is taken)
and ``labels`` as class ids [N]; tensors, arrays and lists are all accepted. The definitions
match scikit-learn's: macro-F1 averages over the classes present in labels or predictions, and
Matthews correlation is the multiclass generalisation (R_K), 0 when undefined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from attribution.core.errors import HeadpruneError


def _as_ids(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = _to_numpy(predictions)
    gold = _to_numpy(labels)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    if pred.ndim != 1 or gold.ndim != 1:
        raise HeadpruneError(
            f"predictions must be [N] ids or [N, C] scores and labels [N], got shapes "
            f"{tuple(pred.shape)} and {tuple(gold.shape)}"
        )
    if pred.shape[0] != gold.shape[0]:
        raise HeadpruneError(f"{pred.shape[0]} predictions but {gold.shape[0]} labels")
    if pred.shape[0] == 0:
        raise HeadpruneError("cannot compute a metric on zero examples")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gold.dtype, np.integer)):
        if not (np.all(np.mod(pred, 1) == 0) and np.all(np.mod(gold, 1) == 0)):
            raise HeadpruneError("class ids must be integers")
    return pred.astype(np.int64), gold.astype(np.int64)


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def confusion_matrix(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(classes [K], counts [K, K])``: counts[i, j] = examples of class i predicted as class j.

    The classes are the sorted union of the ids in labels and predictions.
    """
    pred, gold = _as_ids(predictions, labels)
    classes = np.union1d(pred, gold)
    gi = np.searchsorted(classes, gold)
    pi = np.searchsorted(classes, pred)
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, (gi, pi), 1)
    return classes, counts


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predictions equal to the label."""
    pred, gold = _as_ids(predictions, labels)
    return float(np.mean(pred == gold))


def macro_f1(predictions: Any, labels: Any) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN)."""
    _, counts = confusion_matrix(predictions, labels)
    tp = np.diag(counts).astype(np.float64)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    # every class here occurs in labels or predictions, so the denominator is positive
    return float(np.mean(2 * tp / (2 * tp + fp + fn)))


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation (Gorodkin's R_K for K classes): in [-1, 1], 0 for chance or undefined."""
    _, counts = confusion_matrix(predictions, labels)
    c = counts.astype(np.float64)
    n = c.sum()
    correct = np.trace(c)
    true_k = c.sum(axis=1)
    pred_k = c.sum(axis=0)
    numerator = correct * n - true_k @ pred_k
    denominator = np.sqrt((n * n - pred_k @ pred_k) * (n * n - true_k @ true_k))
    return float(numerator / denominator) if denominator > 0 else 0.0


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "matthews_corrcoef": matthews_corrcoef,
}
_ALIASES = {
    "acc": "accuracy",
    "f1": "macro_f1",
    "f1_macro": "macro_f1",
    "mcc": "matthews_corrcoef",
    "matthews": "matthews_corrcoef",
}


def compute_metrics(predictions: Any, labels: Any, names: Sequence[str] = ("accuracy", "macro_f1")) -> dict[str, float]:
    """``{name: value}`` for each requested metric (names as given, aliases like "mcc" allowed)."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if _ALIASES.get(n, n) not in METRICS]
    if unknown:
        raise HeadpruneError(
            f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)} (aliases: {', '.join(_ALIASES)})"
        )
    pred, gold = _as_ids(predictions, labels)
    return {n: METRICS[_ALIASES.get(n, n)](pred, gold) for n in names}
