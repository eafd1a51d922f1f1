"""``frontier``: the accuracy–latency frontier, every point measured: the dense model, heads only
and heads + neurons at each of the recipe's budgets (unrepaired and repaired), all timed
interleaved with the dense model on the same batches (``compress/frontier.json``). The healed and
INT8 points come from their own stages."""

from __future__ import annotations

from typing import Any

from attribution.core.errors import HeadpruneError
from prune.pipeline.artifacts import DenseRun, FrontierPoint, FrontierRun
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult
from prune.pipeline.stages.compress import compress_inputs, cost_kind, load_inputs, repair_rows
from prune.pipeline.stages.latency_model import threads


class FrontierStage(Stage):
    name = "frontier"
    reads = ("compress-score", "latency-model", "dense")
    writes = ("compress/frontier.json",)

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        compress = ctx.recipe.compress
        return [cls()] if compress is not None and compress.frontier else []

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {**compress_inputs(ctx), "cost": ctx.recipe.section("cost"), "threads": threads(ctx)}

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.core.processes import torch_threads
        from prune.compress import apply, cost_function, plan, widths
        from prune.cost import measure_latency

        section, evaluation = ctx.recipe.compress, ctx.recipe.evaluate
        dense, _ = ctx.dense
        head_scores, neuron_scores, latency = load_inputs(ctx)
        calibration, guard = repair_rows(ctx)
        kind = cost_kind(ctx)
        cost = cost_function(dense, kind, seq_len=latency.seq_len, latency_model=latency)
        data = ctx.rows("evaluate")

        def evaluate(model: Any) -> dict[str, float]:
            return ctx.evaluate(model, data, evaluation.metrics, evaluation.batch_size)

        models: dict[str, Any] = {"dense": dense}
        entries: list[tuple[str, float, Any]] = []
        for fraction in sorted(section.frontier, reverse=True):
            for heads_only in (True, False):
                label = f"{'heads only' if heads_only else 'heads + neurons'} at {fraction:.0%}"
                try:
                    result = plan(dense, head_scores, neuron_scores, cost, fraction, kind=kind, heads_only=heads_only)
                except HeadpruneError as error:  # e.g. heads alone cannot reach the budget
                    ctx.log(f"[frontier] {label}: skipped ({error})")
                    continue
                outcome = apply(dense, result, repair=section.repair, calibration=calibration, held_out=guard,
                                evaluate=evaluate)
                models[label] = outcome.model
                entries.append((label, fraction, outcome))
                ctx.log(f"[frontier] {label}: " + ", ".join(
                    f"{name} {values[evaluation.metrics[0]]:.4f}" for name, values in outcome.metrics.items()
                ))
        if not ctx.main:
            return StageResult()
        repeats = ctx.recipe.cost.repeats if ctx.recipe.cost else 10
        with torch_threads(threads(ctx)):
            measured = measure_latency(models, ctx.timing_batches, repeats=repeats, progress=ctx.progress)
        dense_ms = {str(k): float(v) for k, v in measured["dense"].items()}

        def point(label: str, budget: float | None, model: Any, metrics: dict[str, float]) -> FrontierPoint:
            ms = {str(k): float(v) for k, v in measured[label if label in measured else "dense"].items()}
            heads, neurons = widths(model)
            return FrontierPoint(
                label=label, budget=budget, heads=sum(heads), neurons=sum(neurons), metrics=metrics,
                latency_ms=ms, speedup={k: dense_ms[k] / v for k, v in ms.items() if v > 0},
                predicted_ms=latency.predict(heads, neurons),
            )

        points = [point("dense", None, dense, DenseRun.load(ctx.out / "dense.json").metrics)]
        for label, fraction, outcome in entries:
            if "pruned" in outcome.metrics:
                points.append(point(label, fraction, outcome.model, outcome.metrics["pruned"]))
            if "repaired" in outcome.metrics:
                repaired = point(label, fraction, outcome.model, outcome.metrics["repaired"])
                repaired.label = f"{label}, repaired ({section.repair})"
                points.append(repaired)
        run = FrontierRun(
            split=evaluation.split, examples=len(data), metric=evaluation.metrics[0],
            batch_sizes=[int(b) for b in ctx.timing_batches], threads=threads(ctx), points=points,
            predicted_batch_size=latency.batch_size,
        )
        run.save(ctx.out / "compress" / "frontier.json")
        for p in points:
            speed = ", ".join(f"b={b}: {s:.2f}x" for b, s in p.speedup.items())
            ctx.log(f"[frontier] {p.label:<40} {run.metric} {p.metrics[run.metric]:.4f}  {speed}")
        return StageResult({"points": len(points)}, list(self.writes))
