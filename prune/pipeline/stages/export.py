"""``export``: ONNX directories of the pruned (``onnx/``) and dense (``onnx-dense/``) model, each
``model.onnx`` + ``config.json`` + the tokenizer files, checked against PyTorch and timed."""

from __future__ import annotations

import dataclasses
from typing import Any

from prune.export import OnnxExport
from prune.pipeline.artifacts import ExportRun
from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult, folder_files


def remote_code(ctx: RunContext) -> bool:
    """Whether the recipe asks the saved pruned checkpoints to carry the modeling file
    (the recipe key ``export.remote_code``; see ``prune.remote_code``)."""
    return bool(ctx.recipe.export is not None and ctx.recipe.export.remote_code)


def remote_code_inputs(ctx: RunContext) -> dict[str, bool]:
    """The fingerprint entry of a stage that saves a pruned checkpoint: present only when
    ``export.remote_code`` is on, so runs without the modeling file keep their fingerprints."""
    return {"remote_code": True} if remote_code(ctx) else {}


class ExportStage(Stage):
    name = "export"
    reads = ("prune",)
    writes = ("export.json", "onnx/model.onnx", "onnx/config.json", "onnx-dense/model.onnx", "onnx-dense/config.json")
    main_only = True

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        export = ctx.recipe.export
        return [cls()] if export is not None and export.onnx else []

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        return {
            "export": recipe.section("export"),
            "pruned": ctx.digests("model/") if recipe.prune is not None else None,
            "cost": recipe.section("cost"),
            "evaluate": recipe.section("evaluate"),
            **ctx.common(),
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.checkpoints import load_model
        from prune.export import ONNX_FILE, export_directory

        recipe = ctx.recipe
        section = recipe.export
        data = ctx.rows("evaluate")
        check = list(ctx.batches(data.select(range(min(section.check_examples, len(data)))), 16, keep_labels=False))
        repeats = recipe.cost.repeats if recipe.cost else 10
        threads = recipe.cost.threads if recipe.cost else None
        targets = []
        if recipe.prune is not None:
            targets.append(("pruned", "onnx"))
        if section.dense:
            targets.append(("dense", "onnx-dense"))
        dense, tokenizer = ctx.dense
        models: dict[str, OnnxExport] = {}
        files = ["export.json"]
        for label, folder in targets:
            model = load_model(str(ctx.out / "model"), tokenizer=False)[0] if label == "pruned" else dense
            exported = export_directory(
                model,
                ctx.out / folder,
                tokenizer,
                opset=section.opset,
                check_batches=check,
                latency_batches=ctx.timing_batches,
                repeats=repeats,
                atol=section.atol,
                threads=threads,
            )
            models[label] = dataclasses.replace(exported, path=f"{folder}/{ONNX_FILE}")
            files += folder_files(ctx, folder)  # the ONNX file, its config and tokenizer: all verified on resume
            timing = ", ".join(f"b={b}: {ms:.1f} ms" for b, ms in exported.latency_ms.items())
            ctx.log(
                f"[export] {label}: {models[label].path}, max |onnx - torch| {exported.max_abs_diff:.1e}; {timing}"
            )
        ExportRun(models).save(ctx.out / "export.json")
        return StageResult({}, files)
