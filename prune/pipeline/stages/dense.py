"""``dense``: the dense model's metrics on the evaluation rows."""

from __future__ import annotations

from typing import Any

from prune.pipeline.artifacts import DenseRun
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


def metrics_text(metrics: dict[str, float]) -> str:
    """``accuracy 0.7560, macro_f1 0.7350``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


class DenseStage(Stage):
    name = "dense"
    reads = ("finetune",)
    writes = ("dense.json",)

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {"evaluate": ctx.recipe.section("evaluate"), **ctx.common()}

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        section = ctx.recipe.evaluate
        model, _ = ctx.dense
        data = ctx.rows("evaluate")
        metrics = ctx.evaluate(model, data, section.metrics, section.batch_size)
        result = DenseRun(section.split, len(data), metrics)
        if ctx.main:
            result.save(ctx.out / "dense.json")
        ctx.log(f"[dense] {metrics_text(metrics)} on {len(data)} {section.split} rows")
        return StageResult({"split": result.split, "examples": result.examples, "metrics": metrics}, ["dense.json"])
