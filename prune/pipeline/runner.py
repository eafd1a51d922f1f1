"""Run a recipe as a chain of resumable stages.

Stages, in the order of :data:`prune.pipeline.stages.STAGES` (each only when the recipe asks)::

    finetune -> dense -> score-<criterion>... -> sweep -> prune -> cost -> export
             -> analysis-tree -> analysis-triggers -> report

Every stage writes its outputs atomically under the output directory and then a marker
``OUT/stages/<stage>.json`` (:class:`~prune.pipeline.artifacts.StageRecord`) holding the
**fingerprint** of its inputs: the recipe sections it uses, the model (content hash of its files),
the data (spec plus content hash of local files), the fingerprints of the stages it reads from,
and the headprune version. A rerun skips every stage whose marker matches (and whose files still
exist) and says so; a stage whose inputs changed says which ones and runs again.

Several processes (``torchrun``/``accelerate launch``): stages deal their work out round-robin
(``attribution.core.processes.mine``), each process writes its own files, and after a barrier the
main process combines them, so results do not depend on the number of processes. Stages marked
``main_only`` run on the main process while the others wait.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attribution import __version__
from attribution.core import processes
from attribution.core.errors import HeadpruneError
from attribution.core.io import atomic_write_text
from prune.pipeline.artifacts import StageRecord
from prune.pipeline.context import RunContext
from prune.pipeline.fingerprints import describe_changes, fingerprint
from prune.pipeline.stage import Stage
from prune.recipe import Recipe

ShardHook = Callable[[str, int], None]


@dataclass
class StageOutcome:
    """What happened to one stage in this invocation: ``ran`` or ``skipped``."""

    name: str
    status: str
    seconds: float
    note: str = ""


@dataclass
class RunResult:
    """The outcome of :func:`run_recipe`: per-stage outcomes, wall time, the final summary."""

    out_dir: Path
    stages: list[StageOutcome]
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    main: bool = True  # False on the other processes of a multi-process launch
    files: list[str] = field(default_factory=list)  # every file the run's stages wrote, relative to out_dir

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]


class Runner:
    """Runs the stages of one recipe into one output directory (see the module docstring)."""

    def __init__(self, ctx: RunContext, *, force: bool = False) -> None:
        self.ctx = ctx
        self.force = force
        self.outcomes: list[StageOutcome] = []

    def marker(self, name: str) -> Path:
        return self.ctx.out / "stages" / f"{name}.json"

    def _load_marker(self, name: str) -> StageRecord | None:
        """The marker of a finished stage, or None if absent or unreadable (then it reruns)."""
        try:
            return StageRecord.load(self.marker(name))
        except HeadpruneError:
            return None

    def execute(self, stage: Stage) -> StageRecord:
        """Run ``stage`` unless a matching marker says it is done."""
        ctx, name = self.ctx, stage.marker_name
        processes.barrier()
        inputs = {**stage.inputs(ctx), "headprune": __version__}
        fp = fingerprint(inputs)
        record = None if self.force else self._load_marker(name)
        if record is not None and record.fingerprint == fp:
            missing = [f for f in record.files if not (ctx.out / f).exists()]
            if not missing and stage.valid(ctx, record):
                ctx.log(f"[{name}] already done (fingerprint {fp[:10]}), skipped")
                ctx.records[name] = record
                self.outcomes.append(StageOutcome(name, "skipped", 0.0))
                stage.finished(ctx, record)
                return record
            reason = f"outputs missing ({missing[0]})" if missing else "outputs no longer valid"
        elif record is not None:
            reason = "inputs changed: " + describe_changes(record.inputs, inputs)
        else:
            reason = "forced" if self.force and self.marker(name).exists() else "not run before"
        ctx.log(f"[{name}] running ({reason})")
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs: dict[str, Any] = {}
        files: list[str] = []
        if ctx.main or not stage.main_only:
            # while the other processes wait at a barrier, the main process uses every core
            with processes.torch_threads(os.cpu_count() if stage.main_only and ctx.world > 1 else None):
                result = stage.run(ctx, fp)
            outputs, files = result.outputs, result.files
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        processes.barrier()
        if ctx.main:
            record = StageRecord(
                name, fp, inputs, outputs, files, round(seconds, 3), time.strftime("%Y-%m-%dT%H:%M:%S"), round(cpu, 3)
            )
            record.save(self.marker(name))
        processes.barrier()
        if not ctx.main:
            record = self._load_marker(name)
            if record is None:
                raise HeadpruneError(f"stage {name}: the main process wrote no marker")
        ctx.records[name] = record
        self.outcomes.append(StageOutcome(name, "ran", seconds))
        ctx.log(f"[{name}] done in {seconds:.1f} s (CPU {cpu:.1f} s)")
        stage.finished(ctx, record)
        return record

    def check_inputs(self) -> None:
        """Everything that can fail on bad input, before the output directory is touched."""
        recipe, ctx = self.ctx.recipe, self.ctx
        splits = ctx.splits
        triggers = recipe.analysis.triggers if recipe.analysis is not None else None
        for purpose, section in (("score", recipe.score), ("sweep", recipe.sweep), ("evaluate", recipe.evaluate)):
            if section is not None and section.split not in splits:
                raise HeadpruneError(f"{purpose}.split {section.split!r} is not a split of {recipe.data.name}")
        for key in ("split", "attack_split") if triggers is not None else ():
            if getattr(triggers, key) not in splits:
                raise HeadpruneError(
                    f"analysis.triggers.{key} {getattr(triggers, key)!r} is not a split of {recipe.data.name}"
                )
        if ctx.out.exists() and not ctx.out.is_dir():
            raise HeadpruneError(f"output path {ctx.out} exists and is not a directory")

    def run(self) -> RunResult:
        from prune.pipeline.stages import STAGES

        started = time.perf_counter()
        ctx = self.ctx
        self.check_inputs()
        if ctx.main:
            (ctx.out / "stages").mkdir(parents=True, exist_ok=True)
            atomic_write_text(ctx.out / "recipe.yaml", ctx.recipe.to_yaml())
            if ctx.command:
                atomic_write_text(ctx.out / "command.txt", ctx.command + "\n")
        processes.barrier()
        ctx.log(f"headprune run: {ctx.recipe.title} -> {ctx.out}  ({ctx.world} process(es))")
        for stage_type in STAGES:
            for stage in stage_type.plan(ctx):
                self.execute(stage)
        seconds = time.perf_counter() - started
        summary = ctx.records["report"].outputs.get("summary", {}) if "report" in ctx.records else {}
        ran = sum(1 for o in self.outcomes if o.status == "ran")
        ctx.log(
            f"finished in {seconds:.1f} s: {ran} stage(s) ran, {len(self.outcomes) - ran} skipped; "
            f"report: {ctx.out / 'report.html'}"
        )
        files = sorted({f for record in ctx.records.values() for f in record.files})
        return RunResult(ctx.out, self.outcomes, seconds, summary, ctx.main, files)


def _threads_per_process() -> int | None:
    """Under a multi-process launch, the cores shared between the processes (unless
    ``OMP_NUM_THREADS`` says otherwise); None: leave torch's choice."""
    world = processes.num_processes() if processes.is_distributed() else 1
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:
        return max(1, (os.cpu_count() or 1) // world)
    return None


def run_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    force: bool = False,
    command: str | None = None,
    on_shard: ShardHook | None = None,
) -> RunResult:
    """Run ``recipe`` into ``out_dir`` (resuming whatever is already done there).

    Args:
        recipe: a validated :class:`~prune.recipe.Recipe`.
        out_dir: where every output goes (created after the data set has loaded).
        progress: progress bars (main process only); log lines go to the ``headprune`` logger.
        force: ignore finished stages and shards; recompute everything.
        command: the command line recorded in the report.
        on_shard: called as ``on_shard(criterion, shard)`` after each saved shard (tests use it
            to simulate a crash mid-attribution).
    """
    with processes.torch_threads(_threads_per_process()):
        ctx = RunContext(recipe, Path(out_dir), command=command, on_shard=on_shard)
        ctx.progress = progress and ctx.main
        return Runner(ctx, force=force).run()
