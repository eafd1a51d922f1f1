"""``compress-score``: heads and feed-forward neurons scored by one criterion on the same rows
(``compress/head-scores.json``, ``compress/neuron-scores.json``)."""

from __future__ import annotations

from typing import Any

from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class CompressScoreStage(Stage):
    name = "compress-score"
    section = "compress"
    reads = ("finetune",)
    writes = ("compress/head-scores.json", "compress/neuron-scores.json")
    main_only = True

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        section = ctx.recipe.compress
        keys = ("criterion", "split", "examples", "batch_size")
        return {"compress": {k: getattr(section, k) for k in keys}, **ctx.common()}

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.compress import score_units

        section = ctx.recipe.compress
        model, _ = ctx.dense
        batches = list(ctx.batches(ctx.rows("compress"), section.batch_size))
        heads, neurons = score_units(model, batches, section.criterion, progress=ctx.progress)
        for scores in (heads, neurons):
            scores.provenance.update(model=ctx.recipe.model, split=section.split)
        heads.save(ctx.out / "compress" / "head-scores.json")
        neurons.save(ctx.out / "compress" / "neuron-scores.json")
        seconds = heads.provenance.get("seconds", 0) + neurons.provenance.get("seconds", 0)
        rows = sum(int(b["input_ids"].shape[0]) for b in batches)
        ctx.log(f"[compress-score] {section.criterion} on {rows} {section.split} rows: {seconds:.1f} s")
        return StageResult({}, list(self.writes))  # the seconds are in stages/compress-score.time.json
