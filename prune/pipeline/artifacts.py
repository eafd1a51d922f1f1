"""Typed run files: what the stages write and the report reads.

Every file is a :class:`~attribution.core.io.Record` (one JSON convention: format tag, version,
atomic save, one-line errors on a corrupt file), so a renamed field fails where it is defined, not
in the report at the end of a long run. The sweep and the pruning decision are the workflow's own
types (:mod:`prune.workflow`); the cost and export entries reuse :mod:`prune.cost` and
:mod:`prune.export`'s records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attribution.core.io import Record, timing_field
from prune.cost import CostReport
from prune.export import OnnxExport
from prune.pipeline.fingerprints import FileDigest
from prune.workflow import PruneDecision, SweepResult

__all__ = [
    "CostRun",
    "DenseRun",
    "ExportRun",
    "FinetuneRun",
    "PruneRun",
    "RepairSummary",
    "StageRecord",
    "StageTiming",
    "SweepPointRecord",
    "SweepResult",
]


@dataclass
class StageRecord(Record):
    """The marker of a finished stage (``stages/<name>.json``): the fingerprint of its inputs, the
    inputs themselves (to say what changed), small outputs, the files it wrote with their size and
    sha256 (checked on resume). No times: identical runs write identical markers (the times are
    in :class:`StageTiming`). Version 1 markers had times and no digests; they load as "run again"."""

    FORMAT = "headprune.StageRecord"
    VERSION = 2

    name: str
    fingerprint: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    digests: dict[str, FileDigest] = field(default_factory=dict)


@dataclass
class StageTiming(Record):
    """``stages/<name>.time.json``: when a stage last ran and how long it took (kept apart from
    the marker so that the marker's bytes depend only on what the stage computed)."""

    FORMAT = "headprune.StageTiming"

    seconds: float
    cpu_seconds: float  # CPU time of the (main) process, all threads: compare runs on busy machines
    finished: str


@dataclass
class FinetuneRun(Record):
    """``finetune.json``: where the fine-tuned model is and how it was trained."""

    FORMAT = "headprune.FinetuneRun"

    path: str
    train_seconds: float | None = None
    metrics: dict[str, dict[str, float]] | None = None
    config: dict[str, Any] | None = None


@dataclass
class DenseRun(Record):
    """``dense.json``: the dense model's metrics on the evaluation rows."""

    FORMAT = "headprune.DenseRun"

    split: str
    examples: int
    metrics: dict[str, float]


@dataclass
class SweepPointRecord(Record):
    """``sweep/<criterion>-<fraction>.json``: one sweep point, kept so a killed sweep resumes."""

    FORMAT = "headprune.SweepPoint"

    fingerprint: str
    criterion: str
    fraction: float
    heads_removed: int | None
    metric: float | None
    error: str | None = None


@dataclass
class RepairSummary:
    """The repair behind a ``prune.json`` (its timing is in ``repair.json``, not here: identical
    runs write identical ``prune.json`` files)."""

    examples: int
    seconds: float | None  # None since the timing moved out (older files have it)
    layers: int


@dataclass
class PruneRun(Record):
    """``prune.json``: the decision, the final model's heads and its metrics (dense, pruned and,
    with repair, repaired) on the evaluation rows."""

    FORMAT = "headprune.PruneRun"

    decision: PruneDecision
    heads_removed: int
    total_heads: int
    fraction: float
    kept: list[list[int]]
    split: str
    examples: int
    metrics: dict[str, dict[str, float]]
    model_dir: str = "model"
    repair: RepairSummary | None = None
    reload_max_abs_diff: float | None = None

    @property
    def kept_per_layer(self) -> list[int]:
        return [len(k) for k in self.kept]

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.metrics.get("repaired", self.metrics["pruned"])


@dataclass
class CostRun(Record):
    """``cost.json``: parameters, FLOPs and measured latency of the dense and the pruned model."""

    FORMAT = "headprune.CostRun"

    dense: CostReport
    pruned: CostReport
    ratios: dict[str, Any]


@dataclass
class ExportRun(Record):
    """``export.json``: the ONNX files, keyed ``pruned`` and ``dense`` (paths relative to the run)."""

    FORMAT = "headprune.ExportRun"

    models: dict[str, OnnxExport]


# --------------------------------------------------------------------------------------------
# Compression (heads and neurons to a budget), heal, INT8
# --------------------------------------------------------------------------------------------


@dataclass
class CompressRun(Record):
    """``compress/compress.json``: the final compressed model: what the search chose for the
    recipe's target, its predicted cost, and its metrics (dense, pruned, repaired) on the
    evaluation rows."""

    FORMAT = "headprune.CompressRun"

    target: str  # latency | flops | max_drop
    fraction: float  # the budget fraction searched (for max_drop: the one bisection accepted)
    criterion: str
    repair: str
    heads_per_layer: list[int]
    neurons_per_layer: list[int]
    heads_removed: int
    neurons_removed: int
    flops_fraction: float
    predicted_ms: float | None
    dense_predicted_ms: float | None
    split: str
    examples: int
    metrics: dict[str, dict[str, float]]
    seconds: float = timing_field()  # in memory only: the stage's time is in stages/compress.time.json
    model_dir: str = "compress/model"
    tolerance_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.metrics.get("repaired", self.metrics.get("pruned", {}))


@dataclass
class FrontierPoint:
    """One measured point of the accuracy–latency frontier."""

    label: str  # dense | heads only | heads + neurons | ... (repaired / healed / INT8)
    budget: float | None  # the budget fraction searched (None for dense, healed, INT8)
    heads: int
    neurons: int
    metrics: dict[str, float]
    latency_ms: dict[str, float]  # batch size -> median ms (PyTorch, or ONNX Runtime for INT8)
    speedup: dict[str, float]  # batch size -> dense PyTorch ms / this point's ms (measured side by side)
    predicted_ms: float | None = None  # the latency model's prediction at the modelled batch size
    backend: str = "torch"


@dataclass
class FrontierRun(Record):
    """``compress/frontier.json``: every point measured, none predicted (the prediction is kept
    beside the measurement of each point, to check the latency model)."""

    FORMAT = "headprune.FrontierRun"

    split: str
    examples: int
    metric: str
    batch_sizes: list[int]
    threads: int
    points: list[FrontierPoint]
    predicted_batch_size: int | None = None  # the latency model's batch size (its predictions are for it)


@dataclass
class HealRun(Record):
    """``compress/heal.json``: the distillation of the compressed model and its metrics after."""

    FORMAT = "headprune.HealRun"

    result: dict[str, Any]  # prune.heal.HealResult.to_dict()
    metrics: dict[str, float]
    model_dir: str = "compress/healed"


@dataclass
class QuantizeRun(Record):
    """``compress/quantize.json``: the final model's FP32 and INT8 ONNX files and their metrics."""

    FORMAT = "headprune.QuantizeRun"

    result: dict[str, Any]  # prune.quantize.QuantizedExport.to_dict()
    source: str  # which model was exported: compress/model or compress/healed
    dense_torch_ms: dict[str, float] = field(default_factory=dict)  # dense FP32 PyTorch, same batches
    speedup_vs_torch: dict[str, float] = field(default_factory=dict)  # dense PyTorch ms / INT8 ONNX ms
