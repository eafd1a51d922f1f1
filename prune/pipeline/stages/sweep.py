"""``sweep``: remove the lowest-ranked fraction of heads by each criterion and measure the metric.

Points are dealt out round-robin to the processes and saved one file each
(``sweep/<criterion>-<fraction>.json``), so a killed sweep resumes point by point; the main
process gathers them into the curves of ``sweep.json`` (:class:`~prune.workflow.SweepResult`).

Each point file carries the fingerprint of what that one point depends on -- its criterion's
scores (content hash), its fraction, the sweep's rows, metric and batch size, the model and the
data -- not the list of fractions: adding fractions computes only the new points, and a point
whose criterion's scores did not change is reused.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from attribution.core import processes
from attribution.core.data import encode
from attribution.core.errors import HeadpruneError
from attribution.core.predict import predict_logits
from attribution.scores import HeadScores
from prune.metrics import compute_metrics
from prune.pipeline.artifacts import SweepPointRecord
from prune.pipeline.context import RunContext
from prune.pipeline.fingerprints import fingerprint as fingerprint_of
from prune.pipeline.stage import Stage, StageResult
from prune.workflow import CurvePoint, SweepResult, head_counts, sweep_point


def _point(path: Any, fingerprint: str) -> SweepPointRecord | None:
    try:
        point = SweepPointRecord.load(path)
    except HeadpruneError:
        return None
    return point if point.fingerprint == fingerprint else None


class SweepStage(Stage):
    name = "sweep"
    section = "sweep"
    reads = ("score",)
    writes = ("sweep.json",)

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        return {
            "sweep": recipe.section("sweep"),
            "scores": ctx.digests(*(f"scores/{c}.json" for c in recipe.score.criteria)),
            "score_rows": [recipe.score.split, recipe.score.examples],  # sweep rows avoid them
            "min_heads_per_layer": recipe.prune.min_heads_per_layer if recipe.prune else 0,
            **ctx.common(),
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        recipe = ctx.recipe
        section = recipe.sweep
        model, tokenizer = ctx.dense
        data = encode(ctx.rows("sweep"), tokenizer, ctx.spec)
        labels = torch.as_tensor(list(data["label"]))
        criteria = list(recipe.score.criteria)
        scores = {c: HeadScores.load(ctx.out / "scores" / f"{c}.json") for c in criteria}
        minimum = recipe.prune.min_heads_per_layer if recipe.prune else 0

        def measure(pruned: Any) -> float:
            logits = predict_logits(
                pruned, tokenizer, data, batch_size=section.batch_size, max_length=ctx.spec.max_length
            )
            return compute_metrics(logits, labels, [section.metric])[section.metric]

        items: list[tuple[str, float]] = [("dense", 0.0)] + [(c, f) for c in criteria for f in section.fractions]
        point_dir = ctx.out / "sweep"
        inputs = self.inputs(ctx)
        shared = {k: v for k, v in inputs.items() if k != "scores"}
        shared["sweep"] = {k: v for k, v in shared["sweep"].items() if k != "fractions"}
        scores_hash = inputs["scores"]
        keys = [
            fingerprint_of({**shared, "criterion": c, "fraction": f, "scores": scores_hash.get(f"scores/{c}.json")})
            for c, f in items
        ]
        reused: list[int] = []
        if ctx.main:  # one reading of the point files, so every process deals out the same list
            reused = [i for i, (c, f) in enumerate(items) if _point(point_dir / f"{c}-{f:.4f}.json", keys[i])]
        reused = processes.broadcast(reused)
        if reused:
            ctx.log(f"[sweep] {len(reused)} of {len(items)} points already measured, reused")
        todo = [i for i in range(len(items)) if i not in reused]
        bar = tqdm(total=len(todo), desc="sweep (criterion x fraction)", unit="pt", disable=not ctx.progress)
        for n, index in enumerate(todo):
            criterion, fraction = items[index]
            if processes.mine(n):
                if criterion == "dense":
                    point = CurvePoint(0.0, 0, float(measure(model)))
                else:
                    point = sweep_point(model, scores[criterion], fraction, measure, min_per_layer=minimum)
                SweepPointRecord(
                    keys[index], criterion, fraction, point.heads_removed, point.metric, point.error
                ).save(point_dir / f"{criterion}-{fraction:.4f}.json")
            bar.update(1)
        bar.close()
        processes.barrier()
        if not ctx.main:
            return StageResult()
        points = [SweepPointRecord.load(point_dir / f"{c}-{f:.4f}.json") for c, f in items]
        _, total, _ = head_counts(model)
        curves = {
            c: [CurvePoint(p.fraction, p.heads_removed, p.metric, p.error) for p in points if p.criterion == c]
            for c in criteria
        }
        result = SweepResult(
            metric=section.metric,
            split=section.split,
            examples=len(data),
            total_heads=total,
            dense=points[0].metric,
            fractions=list(section.fractions),
            curves=curves,
        )
        result.save(ctx.out / "sweep.json")
        ctx.log(f"[sweep] dense {section.metric} {result.dense:.4f} on {len(data)} {section.split} rows")
        for c in criteria:
            line = "  ".join(
                f"{p.fraction:.2f}:{p.metric:.3f}" if p.metric is not None else f"{p.fraction:.2f}:-" for p in curves[c]
            )
            ctx.log(f"[sweep] {c:>9}  {line}")
        outputs = {"dense": result.dense, "points_reused": len(reused), "points_computed": len(todo)}
        return StageResult(outputs, ["sweep.json"])
