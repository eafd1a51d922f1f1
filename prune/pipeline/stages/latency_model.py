"""``latency-model``: a latency model fitted from timings of attention blocks with 0..H heads and
feed-forward blocks with 0..F neurons, at the recipe's batch size (``compress/latency.json``).

The sequence length is that of the batch the frontier and the quantize stage time at that batch
size (``RunContext.timing_batches``: rows padded to their longest, T = 55 for 32 tweets), so the
model predicts the latency the report measures; the evaluation rows' mean token length (T = 33)
when the recipe does not time that batch size. Fitted at the mean length instead, the model
predicted the measured speed-ups 6-10% too high (attention, quadratic in T, weighs more there)."""

from __future__ import annotations

from typing import Any

from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


def threads(ctx: RunContext) -> int:
    """The thread count latency is modelled and measured with (``cost.threads``, default 1)."""
    cost = ctx.recipe.cost
    return int(cost.threads) if cost is not None and cost.threads else 1


class LatencyModelStage(Stage):
    name = "latency-model"
    section = "compress"
    reads = ("finetune",)
    writes = ("compress/latency.json",)
    main_only = True

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        section = ctx.recipe.compress
        return {
            "backend": section.backend,
            "batch_size": section.latency_batch_size,
            "threads": threads(ctx),
            "evaluate": ctx.recipe.section("evaluate"),
            "cost": ctx.recipe.section("cost"),
            **ctx.common(),
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.cost import mean_token_length
        from prune.latency import fit_latency_model

        section = ctx.recipe.compress
        model, tokenizer = ctx.dense
        timed = ctx.timing_batches.get(section.latency_batch_size)
        if timed is not None:
            seq_len = int(timed["input_ids"].shape[1])
        else:
            seq_len = round(mean_token_length(ctx.rows("evaluate"), tokenizer, ctx.spec.max_length))
        fitted = fit_latency_model(
            model,
            backend=section.backend,
            batch_size=section.latency_batch_size,
            seq_len=seq_len,
            threads=threads(ctx),
            progress=ctx.progress,
        )
        fitted.save(ctx.out / "compress" / "latency.json")
        heads, neurons = fitted.shape.heads, fitted.shape.ffn
        layers = fitted.shape.layers
        dense_ms = fitted.predict([heads] * layers, [neurons] * layers)
        ctx.log(
            f"[latency-model] {section.backend}, batch {section.latency_batch_size}, T={seq_len}: "
            f"dense {dense_ms:.1f} ms predicted; attention {fitted.attention_ms(heads):.2f} ms, "
            f"feed-forward {fitted.ffn_ms(neurons):.2f} ms a layer"
        )
        return StageResult({"seq_len": seq_len, "dense_ms": dense_ms}, list(self.writes))
