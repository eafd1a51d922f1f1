"""The typed run files of one run, as the report reads them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attribution.scores import HeadScores
from prune.pipeline.artifacts import (
    CompressRun,
    CostRun,
    DenseRun,
    ExportRun,
    FinetuneRun,
    FrontierRun,
    HealRun,
    PruneRun,
    QuantizeRun,
)
from prune.repair import RepairResult
from prune.workflow import SweepResult


@dataclass
class RunFiles:
    """Every run file the report uses (None where the run has none)."""

    finetune: FinetuneRun | None = None
    dense: DenseRun | None = None
    sweep: SweepResult | None = None
    prune: PruneRun | None = None
    repair: RepairResult | None = None
    cost: CostRun | None = None
    export: ExportRun | None = None
    compress: CompressRun | None = None
    frontier: FrontierRun | None = None
    heal: HealRun | None = None
    quantize: QuantizeRun | None = None
    scores: dict[str, HeadScores] = field(default_factory=dict)
    analysis: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, out: Path, files: Collection[str] | None = None) -> RunFiles:
        """Load the run files in ``out``; with ``files`` (paths relative to ``out``), only those:
        files of other recipes run earlier in the same directory are ignored."""

        def ours(name: str) -> bool:
            return (out / name).is_file() and (files is None or name in files)

        def read(name: str, kind: Any) -> Any:
            return kind.load(out / name) if ours(name) else None

        found = cls(
            finetune=read("finetune.json", FinetuneRun),
            dense=read("dense.json", DenseRun),
            sweep=read("sweep.json", SweepResult),
            prune=read("prune.json", PruneRun),
            repair=read("repair.json", RepairResult),
            cost=read("cost.json", CostRun),
            export=read("export.json", ExportRun),
            compress=read("compress/compress.json", CompressRun),
            frontier=read("compress/frontier.json", FrontierRun),
            heal=read("compress/heal.json", HealRun),
            quantize=read("compress/quantize.json", QuantizeRun),
        )
        for path in sorted((out / "scores").glob("*.json")):
            name = str(path.relative_to(out))
            if ours(name):
                found.scores[path.stem] = HeadScores.load(path)
        trees = sorted(p for p in (out / "analysis" / "trees").glob("tree-*") if p.is_file())
        for path in [*trees, out / "analysis" / "triggers.json"]:
            if ours(str(path.relative_to(out))):
                found.analysis.append(str(path.relative_to(out)))
        return found
