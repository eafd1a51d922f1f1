"""``prune``: the decision (which criterion, how many heads), removal, repair, the saved model."""

from __future__ import annotations

from typing import Any

from prune.pipeline.artifacts import DenseRun, PruneRun, RepairSummary, StageRecord
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult, folder_files
from prune.pipeline.stages.dense import metrics_text
from prune.pipeline.stages.export import remote_code, remote_code_inputs
from prune.workflow import SweepResult, Target, decide, head_counts, prune_and_repair, save_checked


class PruneStage(Stage):
    name = "prune"
    section = "prune"
    reads = ("score", "sweep", "dense")
    writes = ("prune.json", "model/config.json", "repair.json")

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        section = recipe.prune
        # the files decide() reads: one criterion's scores or all of them, the sweep only when the
        # criterion or the fraction is chosen from it
        best = section.criterion == "best"
        criteria = recipe.score.criteria if best else [section.criterion]
        uses_sweep = best or section.target.max_drop is not None
        return {
            "prune": recipe.section("prune"),
            "repair": recipe.section("repair"),
            "evaluate": recipe.section("evaluate"),
            "files": ctx.digests(
                *(f"scores/{c}.json" for c in criteria),
                *(["sweep.json"] if uses_sweep and recipe.sweep is not None else []),
                "dense.json",
            ),
            **remote_code_inputs(ctx),
            **ctx.common(),
        }

    def valid(self, ctx: RunContext, record: StageRecord) -> bool:
        return (ctx.out / "model" / "config.json").is_file()

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.scores import HeadScores

        recipe = ctx.recipe
        dense, tokenizer = ctx.dense
        target = recipe.prune.target
        scores = {c: HeadScores.load(ctx.out / "scores" / f"{c}.json") for c in recipe.score.criteria}
        sweep = SweepResult.load(ctx.out / "sweep.json") if recipe.sweep is not None else None
        decision = decide(
            scores,
            Target(target.fraction, target.keep_per_layer, target.max_drop),
            criterion=recipe.prune.criterion,
            sweep=sweep,
            min_per_layer=recipe.prune.min_heads_per_layer,
        )
        evaluation = recipe.evaluate
        data = ctx.rows("evaluate")
        calibration = None
        if recipe.repair is not None:
            calibration = ctx.batches(ctx.rows("repair"), recipe.repair.batch_size, keep_labels=False)
        outcome = prune_and_repair(
            dense,
            decision.heads,
            evaluate=lambda m: ctx.evaluate(m, data, evaluation.metrics, evaluation.batch_size),
            calibration=calibration,
            progress=ctx.progress,
        )
        removed, total, kept = head_counts(outcome.model)
        ctx.log(
            f"[prune] {decision.criterion}: removing {removed} of {total} heads "
            f"({removed / total:.0%}); {decision.reason}"
        )
        dense_metrics = DenseRun.load(ctx.out / "dense.json").metrics
        metrics = {"dense": dense_metrics, **outcome.metrics}
        files = ["prune.json"]
        repair = None
        if outcome.repair is not None:
            if ctx.main:
                outcome.repair.save(ctx.out / "repair.json")
            files.append("repair.json")
            repair = RepairSummary(outcome.repair.examples, None, len(outcome.repair.layers))
        ctx.log(f"[prune] dense {metrics_text(dense_metrics)}")
        ctx.log(f"[prune] pruned {metrics_text(metrics['pruned'])}")
        if "repaired" in metrics:
            ctx.log(f"[prune] repaired {metrics_text(metrics['repaired'])}")
        run = PruneRun(
            decision=decision,
            heads_removed=removed,
            total_heads=total,
            fraction=removed / total,
            kept=kept,
            split=evaluation.split,
            examples=len(data),
            metrics=metrics,
            repair=repair,
        )
        if ctx.main:
            probe = next(iter(ctx.batches(data.select(range(min(16, len(data)))), 16, keep_labels=False)))
            run.reload_max_abs_diff = save_checked(
                outcome.model, ctx.out / "model", tokenizer, probe, remote_code=remote_code(ctx)
            )
            run.save(ctx.out / "prune.json")
            files += folder_files(ctx, "model")
        return StageResult({"criterion": decision.criterion, "heads_removed": removed}, files)
