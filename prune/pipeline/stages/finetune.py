"""``finetune``: resolve the model; with a finetune section (or ``model: default``), a cached fine-tune.

Every process runs it: a fine-tune that is not cached yet is data-parallel over the processes of a
launch (``prune.training``), and the main process alone writes the model and ``finetune.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prune.pipeline.artifacts import FinetuneRun, StageRecord
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class FinetuneStage(Stage):
    name = "finetune"
    writes = ("finetune.json",)

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        recipe = ctx.recipe
        if recipe.finetune is None and recipe.model != "default":
            from prune.checkpoints import resolve_model

            ctx.model_path = resolve_model(recipe.model)
            ctx.log(f"[model] {recipe.model} -> {ctx.model_path}")
            return []
        return [cls()]

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        return {
            "model": recipe.model,
            "finetune": recipe.section("finetune"),
            "data": ctx.data_hash if recipe.finetune is not None else None,
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.core.io import read_json
        from prune.checkpoints import resolve_model
        from prune.finetune import FINETUNE_META, finetune

        recipe = ctx.recipe
        if recipe.finetune is None:
            path = Path(resolve_model("default", progress=ctx.progress))
        else:
            options = recipe.finetune
            result = finetune(
                recipe.model,
                ctx.spec,
                train_examples=options.train_examples,
                epochs=options.epochs,
                lr=options.lr,
                batch_size=options.batch_size,
                max_length=ctx.spec.max_length,
                seed=options.seed,
                progress=ctx.progress,
            )
            how = "reused from the cache" if result.cached else f"trained in {result.seconds:.0f} s"
            ctx.log(f"[finetune] {how}: validation accuracy {result.validation_accuracy:.4f}")
            path = Path(result.path)
        meta = read_json(path / FINETUNE_META) if (path / FINETUNE_META).is_file() else {}
        run = FinetuneRun(str(path), meta.get("seconds"), meta.get("metrics"), meta.get("config"))
        if ctx.main:
            run.save(ctx.out / "finetune.json")
        outputs = {"path": run.path, "train_seconds": run.train_seconds, "metrics": run.metrics, "config": run.config}
        return StageResult(outputs, ["finetune.json"])

    def valid(self, ctx: RunContext, record: StageRecord) -> bool:
        return Path(record.outputs.get("path", "")).is_dir()

    def finished(self, ctx: RunContext, record: StageRecord) -> None:
        ctx.model_path = record.outputs["path"]
        ctx.log(f"[model] {ctx.model_path}")
