"""``compress``: the final compressed model for the recipe's target — a latency or multiply-add
budget, or the most compression within an accuracy tolerance — searched over heads and neurons
together, removed, repaired, measured on the evaluation rows and saved (``compress/model/``)."""

from __future__ import annotations

import time
from typing import Any

from prune.pipeline.artifacts import CompressRun, DenseRun, StageRecord
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult, folder_files
from prune.pipeline.stages.dense import metrics_text
from prune.pipeline.stages.export import remote_code, remote_code_inputs

REPAIR_BATCH = 32


def compress_inputs(ctx: RunContext) -> dict[str, Any]:
    """What a compressed model depends on (the compress and frontier stages share it)."""
    return {
        "compress": ctx.recipe.section("compress"),
        "evaluate": ctx.recipe.section("evaluate"),
        "files": ctx.digests(
            "compress/head-scores.json", "compress/neuron-scores.json", "compress/latency.json", "dense.json"
        ),
        **ctx.common(),
    }


def cost_kind(ctx: RunContext) -> str:
    """What the budgets count: multiply-adds for a flops target, else the latency model's ms."""
    return "flops" if ctx.recipe.compress.target.flops is not None else "latency"


def load_inputs(ctx: RunContext) -> tuple[Any, Any, Any]:
    """``(head scores, neuron scores, latency model)`` written by the upstream stages."""
    from attribution.scores import HeadScores, NeuronScores
    from prune.latency import LatencyModel

    folder = ctx.out / "compress"
    return (
        HeadScores.load(folder / "head-scores.json"),
        NeuronScores.load(folder / "neuron-scores.json"),
        LatencyModel.load(folder / "latency.json"),
    )


def repair_rows(ctx: RunContext) -> tuple[list[dict], list[dict]]:
    """Calibration and guard batches of the repair (training rows, labels dropped)."""
    calibration = list(ctx.batches(ctx.rows("calibration"), REPAIR_BATCH, keep_labels=False))
    guard = list(ctx.batches(ctx.rows("guard"), REPAIR_BATCH, keep_labels=False))
    return calibration, guard


class CompressStage(Stage):
    name = "compress"
    section = "compress"
    reads = ("compress-score", "latency-model", "dense")
    writes = ("compress/compress.json", "compress/model/config.json")

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {**compress_inputs(ctx), **remote_code_inputs(ctx)}

    def valid(self, ctx: RunContext, record: StageRecord) -> bool:
        return (ctx.out / "compress" / "model" / "config.json").is_file()

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.compress import apply, compress_to_tolerance, cost_function, counts_text, plan, widths
        from prune.latency import flops, model_shape
        from prune.workflow import save_checked

        started = time.perf_counter()
        section, evaluation = ctx.recipe.compress, ctx.recipe.evaluate
        dense, tokenizer = ctx.dense
        head_scores, neuron_scores, latency = load_inputs(ctx)
        calibration, guard = repair_rows(ctx)
        target = section.target
        kind = cost_kind(ctx)
        cost = cost_function(dense, kind, seq_len=latency.seq_len, latency_model=latency)
        history: list[dict[str, Any]] = []
        if target.max_drop is not None:
            rows = ctx.rows("tolerance")
            metric = evaluation.metrics[0]

            def metric_of(model: Any) -> float:
                return ctx.evaluate(model, rows, [metric], evaluation.batch_size)[metric]

            result, steps = compress_to_tolerance(
                dense, head_scores, neuron_scores, cost, kind=kind, max_drop=target.max_drop,
                dense_metric=metric_of(dense), metric_of=metric_of, repair=section.repair,
                calibration=calibration, held_out=guard,
            )
            history = [vars(step) for step in steps]
            fraction = result.fraction
        else:
            fraction = target.latency if target.latency is not None else target.flops
            result = plan(dense, head_scores, neuron_scores, cost, fraction, kind=kind)
        data = ctx.rows("evaluate")
        outcome = apply(
            dense, result, repair=section.repair, calibration=calibration, held_out=guard,
            evaluate=lambda m: ctx.evaluate(m, data, evaluation.metrics, evaluation.batch_size),
            progress=ctx.progress,
        )
        heads, neurons = widths(outcome.model)
        shape = model_shape(dense)
        dense_heads, dense_neurons = widths(dense)
        flops_fraction = flops(shape, heads, neurons, latency.seq_len) / flops(
            shape, dense_heads, dense_neurons, latency.seq_len
        )
        metrics = {"dense": DenseRun.load(ctx.out / "dense.json").metrics, **outcome.metrics}
        run = CompressRun(
            target=kind if target.max_drop is None else "max_drop",
            fraction=float(fraction),
            criterion=section.criterion,
            repair=section.repair,
            heads_per_layer=heads,
            neurons_per_layer=neurons,
            heads_removed=sum(dense_heads) - sum(heads),
            neurons_removed=sum(dense_neurons) - sum(neurons),
            flops_fraction=flops_fraction,
            predicted_ms=latency.predict(heads, neurons),
            dense_predicted_ms=latency.predict(dense_heads, dense_neurons),
            split=evaluation.split,
            examples=len(data),
            metrics=metrics,
            seconds=round(time.perf_counter() - started, 2),
            tolerance_history=history,
        )
        ctx.log(f"[compress] {counts_text(heads, neurons)}; multiply-adds {flops_fraction:.0%} of dense, "
                f"predicted {run.predicted_ms:.1f} of {run.dense_predicted_ms:.1f} ms")
        for name, values in metrics.items():
            ctx.log(f"[compress] {name} {metrics_text(values)}")
        if ctx.main:
            probe = next(iter(ctx.batches(data.select(range(min(16, len(data)))), 16, keep_labels=False)))
            save_checked(
                outcome.model, ctx.out / "compress" / "model", tokenizer, probe, remote_code=remote_code(ctx)
            )
            if outcome.repair is not None:
                outcome.repair.save(ctx.out / "compress" / "repair.json")
            run.save(ctx.out / "compress" / "compress.json")
        files = ["compress/compress.json", *folder_files(ctx, "compress/model")] if ctx.main else []
        files += ["compress/repair.json"] if outcome.repair is not None and ctx.main else []
        return StageResult({"fraction": run.fraction, "final": run.final_metrics}, files)
