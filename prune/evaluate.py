"""Re-evaluating a (pruned) classifier: accuracy, macro-F1, any metric of ``prune.metrics`` or any
metric Hugging Face ``evaluate`` loads, on one process or sharded across many (see
``attribution.core.processes``): the logits are gathered, so every process computes the metrics
of all rows and reports the same result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from attribution.core import processes
from attribution.core.data import DataSpec
from attribution.core.errors import HeadpruneError
from attribution.core.io import Record
from attribution.core.predict import predict_logits
from prune.metrics import check_metrics, compute_metrics

DEFAULT_METRICS = ("accuracy", "macro_f1")


@dataclass
class EvalResult(Record):
    """Metrics of one model on one split; ``examples`` rows were scored, each exactly once.
    Saved as a ``headprune.EvalResult`` record."""

    FORMAT: ClassVar[str] = "headprune.EvalResult"
    VERSION: ClassVar[int] = 1

    metrics: dict[str, float]
    examples: int
    model: str = ""
    data: str = ""
    split: str = ""
    seconds: float = 0.0
    processes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        values = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        return f"{self.model or 'model'} on {self.data}/{self.split} ({self.examples} examples): {values}"


def evaluate(
    model: PreTrainedModel,
    tokenizer: Any,
    dataset: Any,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = False,
    model_name: str = "",
    data_name: str = "",
    split: str = "",
    sharded: bool = True,
) -> EvalResult:
    """Predict every row of ``dataset`` (with a ``label`` column) and compute ``metrics``.

    ``sharded``: split the rows across the processes of a multi-process launch (every process must
    call it then); ``False`` for code that runs on one process while the others wait."""
    if "label" not in dataset.column_names:
        raise HeadpruneError(f"the data set has no 'label' column (columns: {', '.join(dataset.column_names)})")
    check_metrics(metrics)  # unknown metric names fail before any work
    started = time.perf_counter()
    logits = predict_logits(
        model, tokenizer, dataset, batch_size=batch_size, max_length=max_length, progress=progress,
        desc="evaluating", sharded=sharded,
    )
    labels = torch.as_tensor(list(dataset["label"]), dtype=torch.long)
    if (labels < 0).any():
        raise HeadpruneError("the data set has unlabelled rows (label -1); evaluate on a labelled split")
    values = compute_metrics(logits, labels, metrics)
    return EvalResult(
        metrics=values,
        examples=int(logits.shape[0]),
        model=model_name or str(getattr(model.config, "_name_or_path", "")),
        data=data_name,
        split=split,
        seconds=round(time.perf_counter() - started, 3),
        processes=processes.num_processes() if sharded else 1,
    )


def evaluation_rows(
    data: DataSpec | str = "tweets",
    *,
    split: str = "test",
    max_examples: int | None = None,
    max_length: int | None = None,
) -> tuple[DataSpec, Any]:
    """``(spec, rows)``: the data spec (``max_length`` applied) and the first ``max_examples`` rows
    of its ``split`` — what ``evaluate_model`` evaluates."""
    from attribution.core.data import as_spec, first_rows, load_splits

    spec = as_spec(data)
    if max_length is not None:
        spec = DataSpec(**{**asdict(spec), "max_length": max_length})
    splits = load_splits(spec)
    if split not in splits:
        raise HeadpruneError(f"no split {split!r} in {spec.name}; choose one of {', '.join(splits)}")
    return spec, first_rows(splits[split], max_examples)


def evaluate_model(
    model: str,
    data: DataSpec | str = "tweets",
    *,
    split: str = "test",
    metrics: Sequence[str] = DEFAULT_METRICS,
    max_examples: int | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Load ``model`` (anything ``prune.checkpoints.load_model`` takes: ``"default"``, a pruned or
    dense directory, a hub id) and evaluate it on ``split`` of ``data`` (a ``DataSpec``, or
    ``"tweets"``, a hub name or a local file; see ``attribution.core.data.load_splits``)."""
    check_metrics(metrics)  # before the data and the model are loaded
    spec, dataset = evaluation_rows(data, split=split, max_examples=max_examples, max_length=max_length)
    from prune.checkpoints import load_model

    loaded, tokenizer = load_model(model, progress=progress)
    return evaluate(
        loaded,
        tokenizer,
        dataset,
        metrics=metrics,
        batch_size=batch_size,
        max_length=spec.max_length,
        progress=progress,
        model_name=model,
        data_name=spec.name,
        split=split,
    )
