"""Classification metrics: built-in ones computed locally, and any metric Hugging Face ``evaluate`` loads.

Every function takes ``predictions`` as class ids [N] or scores/logits [N, C] (argmax is taken)
and ``labels`` as class ids [N]; tensors, arrays and lists are all accepted. The built-in
definitions match scikit-learn's: macro-F1 averages over the classes present in labels or
predictions, and Matthews correlation is the multiclass generalisation (R_K), 0 when undefined.

A metric name that is not built-in (nor an alias of one) is loaded with ``evaluate.load``: a local
metric script (``path/to/my_metric.py``, or a directory holding ``<dir name>.py``) or, where the
hub is reachable, a hub metric (``"precision"``, ``"user/metric"``). Such a metric is given the
predicted class ids and the labels (``compute(predictions=..., references=...)``) and must return
one number (or a dictionary holding one number, or one entry named like the metric). Built-in
names always win, so the default metrics never need ``evaluate`` nor the network. Callers read
every metric as higher-is-better (the sweep's ``max_drop``, the iterative tolerance).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
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
ALIASES = {
    "acc": "accuracy",
    "f1": "macro_f1",
    "f1_macro": "macro_f1",
    "mcc": "matthews_corrcoef",
    "matthews": "matthews_corrcoef",
}


HUB_PROBE_TIMEOUT = 3.0  # seconds: how long "is the hub reachable?" may take before evaluate is asked


def builtin_name(name: str) -> str | None:
    """The built-in metric ``name`` denotes (aliases resolved), or ``None``."""
    canonical = ALIASES.get(name, name)
    return canonical if canonical in METRICS else None


def metric_function(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The function computing metric ``name`` from class ids ``(predictions [N], labels [N])``.

    Built-in names and aliases first; any other name is loaded once per process with
    ``evaluate.load`` (see the module docstring). Raises a one-line ``HeadpruneError`` naming the
    metric when it cannot be loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise HeadpruneError(f"a metric name must be a non-empty string, got {name!r}")
    builtin = builtin_name(name)
    if builtin is not None:
        return METRICS[builtin]
    key = name.strip()
    if _looks_like_path(key) and os.path.exists(os.path.expanduser(key)):
        key = str(Path(key).expanduser().resolve())  # one cache entry per file, whatever the working directory
    module = _load_evaluate_metric(key)
    return functools.partial(_evaluate_value, module, name)


def check_metrics(names: Sequence[str]) -> None:
    """Raise the one-line error of the first metric that cannot be computed (loading, not computing)."""
    for name in [names] if isinstance(names, str) else names:
        metric_function(name)


def compute_metrics(predictions: Any, labels: Any, names: Sequence[str] = ("accuracy", "macro_f1")) -> dict[str, float]:
    """``{name: value}`` for each requested metric (names as given: aliases like "mcc", local
    metric scripts and hub metrics allowed, see ``metric_function``)."""
    if isinstance(names, str):
        names = [names]
    functions = [metric_function(n) for n in names]  # unknown names fail before any work
    pred, gold = _as_ids(predictions, labels)
    return {n: float(f(pred, gold)) for n, f in zip(names, functions, strict=True)}


# --------------------------------------------------------------------------------------------
# metrics loaded with Hugging Face evaluate


def _builtins_listing() -> str:
    return f"{', '.join(METRICS)}; aliases {', '.join(ALIASES)}"


def _looks_like_path(name: str) -> bool:
    # hub names are "metric" or "owner/metric"; anything else path-shaped is a local script
    return os.path.exists(name) or name.endswith(".py") or name.startswith(("/", ".", "~")) or name.count("/") > 1


def _offline_by_environment() -> bool:
    true = {"1", "ON", "YES", "TRUE"}
    return any(os.environ.get(key, "").upper() in true for key in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (any HTTP status counts);
    ``False`` without asking when ``HF_HUB_OFFLINE`` or ``HF_EVALUATE_OFFLINE`` is set."""
    if _offline_by_environment():
        return False
    import requests
    from huggingface_hub import constants

    try:
        requests.head(constants.ENDPOINT, timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return False
    return True


@functools.cache
def _load_evaluate_metric(name: str) -> Any:
    """``evaluate.load(name)`` made safe offline: a local script is loaded without the network; a
    hub name only from the hub when it answers (else only from evaluate's cache), so an offline
    machine gets a one-line error within seconds instead of waiting out evaluate's 100 s timeouts."""
    unknown = f"unknown metric {name!r}: not built-in ({_builtins_listing()})"
    if _looks_like_path(name):
        path = Path(name).expanduser()
        script = path / f"{path.name}.py" if path.is_dir() else path
        if not script.is_file() or script.suffix != ".py":
            raise HeadpruneError(
                f"{unknown}, and no metric script at {name} (a .py file, or a directory holding <dir name>.py)"
            )
        return _evaluate_load(str(script), f"metric script {script}")
    if hub_reachable():
        return _evaluate_load(name, unknown, module_type="metric")
    cached = _cached_hub_script(name)
    if cached is None:
        raise HeadpruneError(
            f"{unknown} nor a local metric script, and not cached from the Hugging Face hub, which is "
            "unreachable here (hub metrics need network)"
        )
    return _evaluate_load(str(cached), f"metric {name!r} (cached at {cached})")


def _cached_hub_script(name: str) -> Path | None:
    """The newest copy of hub metric ``name`` in evaluate's module cache, found as evaluate itself
    finds it offline (``CachedEvaluationModuleFactory``), or ``None``. Loading that file as a local
    script keeps evaluate from touching the network at all (its hub loader pings the hub first)."""
    from evaluate.loading import CachedEvaluationModuleFactory, init_dynamic_modules

    key = name.replace("/", "--") if "/" in name else f"evaluate-metric--{name}"
    try:
        module = CachedEvaluationModuleFactory(key).get_module()
    except (FileNotFoundError, OSError):
        return None
    script = Path(init_dynamic_modules(), "metrics", key, module.hash, key.split("--")[-1] + ".py")
    return script if script.is_file() else None


def _evaluate_load(path: str, what: str, **kwargs: Any) -> Any:
    import evaluate

    try:
        # in memory: no cache files, so concurrent processes never contend for evaluate's file locks
        return evaluate.load(path, keep_in_memory=True, **kwargs)
    except Exception as error:
        raise HeadpruneError(f"{what}; evaluate could not load it: {_one_line(error)}") from None


def _evaluate_value(module: Any, name: str, pred: np.ndarray, gold: np.ndarray) -> float:
    """One number from an ``evaluate`` metric given class ids (predictions [N], references [N])."""
    try:
        result = module.compute(predictions=pred.tolist(), references=gold.tolist())
    except Exception as error:
        raise HeadpruneError(f"metric {name!r} failed on {len(gold)} examples: {_one_line(error)}") from None
    if isinstance(result, dict):
        numbers = {k: v for k, v in result.items() if _is_number(v)}
        own = getattr(module, "name", None)
        if len(numbers) == 1:
            return float(next(iter(numbers.values())))
        if own in numbers:
            return float(numbers[own])
        found = ", ".join(map(str, result)) or "nothing"
        raise HeadpruneError(f"metric {name!r} returned {found}: expected one number (or an entry named {own!r})")
    if _is_number(result):
        return float(result)
    raise HeadpruneError(f"metric {name!r} returned {type(result).__name__}: expected a number or a dictionary")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.number)
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
