"""``cost``: parameters, FLOPs and measured latency of the dense and the pruned model, timed
interleaved on the same batches (``cost.threads`` threads)."""

from __future__ import annotations

from typing import Any

import torch

from attribution.core.processes import torch_threads
from prune.pipeline.artifacts import CostRun
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class CostStage(Stage):
    name = "cost"
    reads = ("prune",)
    writes = ("cost.json",)
    main_only = True

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        return [cls()] if ctx.recipe.prune is not None and ctx.recipe.cost is not None else []

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        return {
            "cost": recipe.section("cost"),
            "pruned": ctx.digests("model/"),
            "evaluate": recipe.section("evaluate"),
            **ctx.common(),
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.checkpoints import load_model
        from prune.cost import compare_costs, cost_report, format_comparison, mean_token_length, measure_latency

        dense, tokenizer = ctx.dense
        pruned, _ = load_model(str(ctx.out / "model"), tokenizer=False)
        mean = mean_token_length(ctx.rows("evaluate"), tokenizer, ctx.spec.max_length)
        repeats = ctx.recipe.cost.repeats
        with torch_threads(ctx.recipe.cost.threads):
            latency = measure_latency(
                {"dense": dense, "pruned": pruned}, ctx.timing_batches, repeats=repeats, progress=ctx.progress
            )
            threads = torch.get_num_threads()
        reports = {
            name: cost_report(model, mean, name=name, latency_ms=latency[name], repeats=repeats)
            for name, model in (("dense", dense), ("pruned", pruned))
        }
        for report in reports.values():
            report.threads = threads
        CostRun(reports["dense"], reports["pruned"], compare_costs(reports["dense"], reports["pruned"])).save(
            ctx.out / "cost.json"
        )
        for line in format_comparison(reports["dense"], reports["pruned"]).splitlines():
            ctx.log(f"[cost] {line}")
        return StageResult({}, ["cost.json"])
