"""``score-<criterion>``: head importance by one criterion, in resumable shards.

The scored rows are cut into shards of ``score.shard_size``; each shard's partial sums (a
:class:`~attribution.criteria.ScorePartial`: ``sum [L, H]`` float64, ``count`` and the criterion's
diagnostics) are saved atomically as soon as the shard is done. A rerun loads the finished shards
and computes only the missing ones; shards are merged in shard order, so the final scores are
bit-for-bit those of an uninterrupted run, on any number of processes (shard ``k`` belongs to
process ``k % N``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attribution.core import processes
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class ScoreStage(Stage):
    name = "score"
    reads = ("finetune",)
    writes = ("scores/{criterion}.json",)

    def __init__(self, criterion: str = "", options: dict[str, Any] | None = None) -> None:
        self.criterion = criterion
        self.options = options or {}

    @property
    def marker_name(self) -> str:
        return f"score-{self.criterion}"

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        score = ctx.recipe.score
        return [cls(name, options) for name, options in (score.criteria.items() if score is not None else ())]

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        section = {k: v for k, v in ctx.recipe.section("score").items() if k != "criteria"}
        return {"criterion": self.criterion, "options": self.options, "score": section, **ctx.common()}

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.criteria import ScoreAccumulator, ScorePartial, finalize_scores, make_criterion

        recipe, name = ctx.recipe, self.criterion
        model, _ = ctx.dense
        relative = f"scores/{name}.json"
        path = ctx.out / relative
        criterion = make_criterion(name, **self.options)
        if not criterion.needs_data:
            if ctx.main:
                scores = finalize_scores(criterion, model, ScoreAccumulator(criterion, model).partial())
                scores.provenance.update(model=recipe.model, model_path=ctx.model_path)
                scores.save(path)
            return StageResult({"examples": 0, "shards": 0}, [relative])

        rows = ctx.rows("score")
        size = recipe.score.shard_size
        n_shards = math.ceil(len(rows) / size)
        shard_dir = ctx.out / "scores" / f"{name}.shards"

        def shard_path(k: int) -> Path:
            return shard_dir / f"shard-{k:05d}.pt"

        done = [k for k in range(n_shards) if ScorePartial.load_matching(shard_path(k), fingerprint) is not None]
        if done:
            ctx.log(f"[score-{name}] resuming: {len(done)} of {n_shards} shards already done")
        todo = [k for k in range(n_shards) if k not in done and processes.mine(k)]
        bar = tqdm(
            total=sum(min(size, len(rows) - k * size) for k in todo),
            desc=f"scoring heads ({name})",
            unit="ex",
            disable=not ctx.progress,
        )
        for k in todo:
            # a fresh criterion per shard: diagnostics are per shard
            accumulator = ScoreAccumulator(make_criterion(name, **self.options), model)
            part = rows.select(range(k * size, min((k + 1) * size, len(rows))))
            for batch in ctx.batches(part, recipe.score.batch_size):
                bar.update(accumulator.update(batch))
            accumulator.partial().save(shard_path(k), fingerprint=fingerprint)
            if ctx.on_shard is not None:
                ctx.on_shard(name, k)
        bar.close()
        processes.barrier()
        if not ctx.main:
            return StageResult()
        shards = [ScorePartial.load_matching(shard_path(k), fingerprint) for k in range(n_shards)]
        scores = finalize_scores(criterion, model, ScorePartial.merge(shards))
        scores.provenance.update(
            model=recipe.model,
            model_path=ctx.model_path,
            split=recipe.score.split,
            shards=n_shards,
            shard_size=size,
        )
        scores.save(path)
        outputs = {
            "examples": int(sum(s.count for s in shards)),
            "shards": n_shards,
            "shards_reused": len(done),
            "shards_computed": n_shards - len(done),
        }
        return StageResult(outputs, [relative])
