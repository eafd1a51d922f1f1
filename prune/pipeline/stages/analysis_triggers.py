"""``analysis-triggers``: trigger patterns mined per class on the dense model (AttAttr §5) and,
optionally, their attack on held-out rows against random tokens (``OUT/analysis/triggers.json``)."""

from __future__ import annotations

from typing import Any

from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class TriggersStage(Stage):
    name = "analysis-triggers"
    reads = ("finetune",)
    writes = ("analysis/triggers.json",)
    main_only = True

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        analysis = ctx.recipe.analysis
        return [cls()] if analysis is not None and analysis.triggers is not None else []

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {"triggers": ctx.recipe.section("analysis")["triggers"], **ctx.common()}

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.triggers import run_triggers

        section = ctx.recipe.analysis.triggers
        model, tokenizer = ctx.dense
        path = ctx.out / "analysis" / "triggers.json"
        report = run_triggers(  # TriggerReport.save writes atomically
            model, tokenizer, ctx.splits, path, split=section.split, examples=section.examples,
            attack=section.attack, attack_split=section.attack_split, attack_examples=section.attack_examples,
            top_k=section.top_k, random_trials=section.random_trials, max_length=ctx.spec.max_length,
            seed=ctx.recipe.seed, progress=ctx.progress, n_steps=section.n_steps, integration=section.integration,
            pairs=section.pairs, batch_size=section.batch_size,
        )
        relative = str(path.relative_to(ctx.out))
        ctx.log(f"[analysis-triggers] {relative}")
        return StageResult({"classes": list(report.label_names)}, [relative])
