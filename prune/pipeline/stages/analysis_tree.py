"""``analysis-tree``: attribution trees (AttAttr §4) of the recipe's texts on the dense model,
written to ``OUT/analysis/trees/tree-<i>.<format>``."""

from __future__ import annotations

from typing import Any

from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class TreeStage(Stage):
    name = "analysis-tree"
    reads = ("finetune",)
    writes = ("analysis/trees/tree-{i}.{format}",)
    main_only = True

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        analysis = ctx.recipe.analysis
        return [cls()] if analysis is not None and analysis.tree is not None else []

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {"tree": ctx.recipe.section("analysis")["tree"], **ctx.common()}

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from attribution.tree_render import write_tree

        section = ctx.recipe.analysis.tree
        model, tokenizer = ctx.dense
        folder = ctx.out / "analysis" / "trees"
        files: list[str] = []
        trees = []
        for i, text in enumerate(section.texts):
            pair = section.text_pairs[i] if section.text_pairs is not None else None
            final = [folder / f"tree-{i}.{fmt.lower().lstrip('.')}" for fmt in section.formats]
            write_tree(  # every format written atomically
                model, tokenizer, text, final, text_pair=pair, tau=section.tau, n_steps=section.n_steps,
                integration=section.integration, max_length=ctx.spec.max_length,
            )
            written = [str(path.relative_to(ctx.out)) for path in final]
            files += written
            trees.append({"text": text, "text_pair": pair, "files": written})
            ctx.log(f"[analysis-tree] tree {i}: {final[0].with_suffix('.*').name}")
        return StageResult({"trees": trees}, files)
