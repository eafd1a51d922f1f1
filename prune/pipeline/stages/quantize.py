"""``quantize``: the final compressed (and healed) model exported to ONNX, checked against
PyTorch, dynamically quantized to INT8 with ONNX Runtime, evaluated through ONNX Runtime on the
evaluation rows, and timed beside dense FP32 PyTorch on the same batches. ``compress/onnx/`` is an
ONNX directory as Optimum lays it out: ``model.onnx``, ``model_quantized.onnx``, ``config.json``
and the tokenizer files."""

from __future__ import annotations

from typing import Any

import torch

from prune.pipeline.artifacts import QuantizeRun
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult, folder_files
from prune.pipeline.stages.latency_model import threads


class QuantizeStage(Stage):
    name = "quantize"
    section = "quantize"
    reads = ("compress", "heal")
    writes = (
        "compress/quantize.json",
        "compress/onnx/model.onnx",
        "compress/onnx/model_quantized.onnx",
        "compress/onnx/config.json",
    )
    main_only = True

    def source(self, ctx: RunContext) -> str:
        return "compress/healed" if ctx.recipe.heal is not None else "compress/model"

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "quantize": ctx.recipe.section("quantize"),
            "compressed": ctx.digests(self.source(ctx) + "/"),
            "evaluate": ctx.recipe.section("evaluate"),
            "cost": ctx.recipe.section("cost"),
            **ctx.common(),
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.core.processes import torch_threads
        from prune.checkpoints import load_model
        from prune.cost import measure_latency
        from prune.export import ONNX_FILE, QUANTIZED_FILE, export_directory
        from prune.quantize import quantize_and_check

        evaluation, section = ctx.recipe.evaluate, ctx.recipe.quantize
        dense, tokenizer = ctx.dense
        model, _ = load_model(str(ctx.out / self.source(ctx)), tokenizer=False)
        data = ctx.rows("evaluate")
        folder = ctx.out / "compress" / "onnx"
        check = list(ctx.batches(data.select(range(min(32, len(data)))), 16, keep_labels=False))
        count = threads(ctx)
        repeats = ctx.recipe.cost.repeats if ctx.recipe.cost else 10
        export_directory(model, folder, tokenizer, check_batches=check, threads=count)
        result = quantize_and_check(
            folder / ONNX_FILE, folder / QUANTIZED_FILE, tokenizer, data,
            latency_batches=ctx.timing_batches, threads=count, per_channel=section.per_channel,
            metrics=evaluation.metrics, batch_size=evaluation.batch_size, max_length=ctx.spec.max_length,
            repeats=repeats, progress=ctx.progress,
        )
        with torch_threads(count), torch.no_grad():
            dense_ms = measure_latency({"dense": dense}, ctx.timing_batches, repeats=repeats)["dense"]
        dense_torch = {str(k): float(v) for k, v in dense_ms.items()}
        int8 = {str(k): float(v) for k, v in result.int8_latency_ms.items()}
        speedup = {k: dense_torch[k] / v for k, v in int8.items() if k in dense_torch and v > 0}
        run = QuantizeRun(result.to_dict(), self.source(ctx), dense_torch, speedup)
        run.save(ctx.out / "compress" / "quantize.json")
        metric = evaluation.metrics[0]
        ctx.log(
            f"[quantize] INT8 {metric} {result.int8_metrics.get(metric, float('nan')):.4f} "
            f"(FP32 ONNX {result.fp32_metrics.get(metric, float('nan')):.4f}), agreement {result.agreement:.2%}; "
            + ", ".join(f"b={b}: {s:.2f}x vs dense PyTorch" for b, s in speedup.items())
        )
        files = ["compress/quantize.json", *folder_files(ctx, "compress/onnx")]
        return StageResult({"speedup": speedup, "agreement": result.agreement}, files)
