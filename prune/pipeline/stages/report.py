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
            "upstream": {name: record.fingerprint for name, record in ctx.records.items()},
            "title": ctx.recipe.title,
        }

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        from prune.report import write_report

        written = write_report(
            ctx.out,
            title=ctx.recipe.title,
            recipe=ctx.recipe.to_dict(),
            command=ctx.command,
            timings={name: (record.seconds, record.cpu_seconds) for name, record in ctx.records.items()},
            environment=ctx.environment(),
            files={f for record in ctx.records.values() for f in record.files},
        )
        files = [str(Path(p).relative_to(ctx.out)) for p in written.files]
        return StageResult({"summary": written.summary}, files)
