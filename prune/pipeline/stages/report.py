"""``report``: ``report.md`` and ``report.html`` from the run files of this run's stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prune.pipeline.context import RunContext
from prune.pipeline.stage import Stage, StageResult


class ReportStage(Stage):
    name = "report"
    reads = ("*",)
    writes = ("report.md", "report.html")
    main_only = True

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "report": ctx.recipe.section("report"),
            "files": ctx.digests(*sorted({f for record in ctx.records.values() for f in record.files})),
            "title": ctx.recipe.title,
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.report import write_report

        written = write_report(
            ctx.out,
            title=ctx.recipe.title,
            recipe=ctx.recipe.to_dict(),
            command=ctx.command,
            timings={name: (t.seconds, t.cpu_seconds) for name, t in ctx.timings.items() if name in ctx.records},
            environment=ctx.environment(),
            files={f for record in ctx.records.values() for f in record.files},
        )
        files = [str(Path(p).relative_to(ctx.out)) for p in written.files]
        return StageResult({"summary": written.summary}, files)
