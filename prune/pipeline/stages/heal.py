"""``heal``: distillation of the compressed model from the dense one under the recipe's wall-clock
budget, early-stopped on validation rows, resumable after a kill (``compress/heal/`` holds its
checkpoint), never worse than where it started; the healed model goes to ``compress/healed/``.

Every process runs it: the heal is data-parallel over the processes of a launch (``prune.heal``)
and the evaluation sharded; the main process alone writes."""

from __future__ import annotations

import shutil
from typing import Any

from prune.pipeline.artifacts import HealRun, StageRecord
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult, folder_files
from prune.pipeline.stages.dense import metrics_text
from prune.pipeline.stages.export import remote_code, remote_code_inputs


class HealStage(Stage):
    name = "heal"
    section = "heal"
    reads = ("compress",)
    writes = ("compress/heal.json", "compress/healed/config.json")

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "heal": ctx.recipe.section("heal"),
            "compressed": ctx.digests("compress/model/"),
            "evaluate": ctx.recipe.section("evaluate"),
            **remote_code_inputs(ctx),
            **ctx.common(),
        }

    def valid(self, ctx: RunContext, record: StageRecord) -> bool:
        return (ctx.out / "compress" / "healed" / "config.json").is_file()

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.checkpoints import load_model
        from prune.heal import heal, parse_duration
        from prune.workflow import save_checked

        section, evaluation = ctx.recipe.heal, ctx.recipe.evaluate
        dense, tokenizer = ctx.dense
        student, _ = load_model(str(ctx.out / "compress" / "model"), tokenizer=False)
        result = heal(
            student, dense, tokenizer, ctx.rows("heal"), ctx.rows("heal-held-out"),
            budget_seconds=parse_duration(section.budget), max_steps=section.max_steps,
            temperature=section.temperature, alpha=section.alpha, lr=section.lr, batch_size=section.batch_size,
            max_length=ctx.spec.max_length, seed=section.seed,
            checkpoint_dir=ctx.out / "compress" / "heal" / fingerprint[:16], progress=ctx.progress,
        )
        data = ctx.rows("evaluate")
        metrics = ctx.evaluate(student, data, evaluation.metrics, evaluation.batch_size)
        ctx.log(f"[heal] {result.summary()}")
        ctx.log(f"[heal] healed {metrics_text(metrics)} on {len(data)} {evaluation.split} rows")
        if not ctx.main:
            return StageResult({"metrics": metrics, "steps": result.steps}, [])  # the main process writes
        probe = next(iter(ctx.batches(data.select(range(min(16, len(data)))), 16, keep_labels=False)))
        save_checked(student, ctx.out / "compress" / "healed", tokenizer, probe, remote_code=remote_code(ctx))
        HealRun(result.to_dict(), metrics).save(ctx.out / "compress" / "heal.json")
        shutil.rmtree(ctx.out / "compress" / "heal", ignore_errors=True)  # the resume state (~4 models) is done
        files = ["compress/heal.json", *folder_files(ctx, "compress/healed")]
        return StageResult({"metrics": metrics, "steps": result.steps}, files)
