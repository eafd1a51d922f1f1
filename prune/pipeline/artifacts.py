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

from attribution.core.io import Record
from prune.cost import CostReport
from prune.export import OnnxExport
from prune.workflow import PruneDecision, SweepResult

__all__ = [
    "CostRun",
    "DenseRun",
    "ExportRun",
    "FinetuneRun",
    "PruneRun",
    "RepairSummary",
    "StageRecord",
    "SweepPointRecord",
    "SweepResult",
]


@dataclass
class StageRecord(Record):
    """The marker of a finished stage (``stages/<name>.json``): the fingerprint of its inputs, the
    inputs themselves (to say what changed), small outputs, the files it wrote and its times."""

    FORMAT = "headprune.StageRecord"

    name: str
    fingerprint: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished: str = ""
    cpu_seconds: float = 0.0  # CPU time of the (main) process, all threads: compare runs on busy machines


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
    examples: int
    seconds: float
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
