"""Run a recipe as a chain of resumable stages.

Stages, in the order of :data:`prune.pipeline.stages.STAGES` (each only when the recipe asks)::

    finetune -> dense -> score-<criterion>... -> sweep -> prune -> cost -> export
             -> analysis-tree -> analysis-triggers -> report

Every stage writes its outputs atomically under the output directory and then a marker
``OUT/stages/<stage>.json`` (:class:`~prune.pipeline.artifacts.StageRecord`) holding the
**fingerprint** of its inputs and the size and sha256 of every file it wrote (its times go to
``stages/<stage>.time.json``, so identical runs write identical markers). The fingerprint covers
the stage's own recipe settings, the model (content hash of its files), the data (spec plus
content hash of local files), the seed, the headprune version, and the *content hashes of the run
files it reads* -- not the settings of the stages that wrote them: a stage whose inputs are
byte-identical to last time is skipped even when an upstream stage reran. A rerun skips a stage
when its marker matches and every recorded output still has its size and sha256 (read once per
rerun: see :mod:`prune.pipeline.fingerprints`); otherwise it reruns it and says why in one line
(``inputs changed: ...``, ``output changed (model/model.safetensors: 12 bytes, 4456 recorded)``).

One run at a time per output directory (:class:`~prune.pipeline.outdir.OutputLock`: a second
run refuses with one line naming the holder; the lock of a killed run is taken over), and the
temporary files of killed runs are removed when the next run starts
(:func:`~prune.pipeline.outdir.remove_leftovers`).

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
from prune.pipeline.artifacts import StageRecord, StageTiming
from prune.pipeline.context import RunContext
from prune.pipeline.fingerprints import check_digest, describe_changes, file_digest, fingerprint
from prune.pipeline.outdir import OutputLock, remove_leftovers
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

    def timing(self, name: str) -> Path:
        return self.ctx.out / "stages" / f"{name}.time.json"

    def _load_marker(self, name: str) -> StageRecord | None:
        """The marker of a finished stage, or None if absent or unreadable (then it reruns)."""
        try:
            return StageRecord.load(self.marker(name))
        except HeadpruneError:
            return None

    def _why_rerun(self, stage: Stage, fp: str, inputs: dict[str, Any]) -> tuple[str | None, StageRecord | None]:
        """``(None, record)`` when the stage is done: a marker with this fingerprint whose every
        recorded output still has its size and sha256; else ``(reason, None)``."""
        name = stage.marker_name
        if self.force:
            return ("forced" if self.marker(name).exists() else "not run before"), None
        record = self._load_marker(name)
        if record is None:
            if not self.marker(name).exists():
                return "not run before", None
            return "its marker is unreadable or was written by an older headprune", None
        if record.fingerprint != fp:
            return "inputs changed: " + describe_changes(record.inputs, inputs), None
        unrecorded = [f for f in record.files if f not in record.digests]
        if unrecorded:
            return f"output {unrecorded[0]} has no recorded digest", None
        for relative, recorded in record.digests.items():
            problem = check_digest(self.ctx.out / relative, recorded)
            if problem == "missing":
                return f"output missing ({relative})", None
            if problem is not None:
                return f"output changed ({relative}: {problem})", None
        if not stage.valid(self.ctx, record):
            return "outputs no longer valid", None
        return None, record

    def execute(self, stage: Stage) -> StageRecord:
        """Run ``stage`` unless its marker says it is done and its outputs are still those bytes."""
        ctx, name = self.ctx, stage.marker_name
        processes.barrier()
        inputs = {**stage.inputs(ctx), "headprune": __version__}
        fp = fingerprint(inputs)
        # the main process decides (it alone reads the outputs back); the others follow
        reason = self._why_rerun(stage, fp, inputs)[0] if ctx.main else None
        reason = processes.broadcast(reason)
        if reason is None:
            record = self._load_marker(name)
            if record is None:
                raise HeadpruneError(f"stage {name}: the marker vanished while the run was reading it")
            ctx.log(f"[{name}] already done (fingerprint {fp[:10]}, outputs verified), skipped")
            ctx.records[name] = record
            try:
                ctx.timings[name] = StageTiming.load(self.timing(name))
            except HeadpruneError:
                pass
            self.outcomes.append(StageOutcome(name, "skipped", 0.0))
            stage.finished(ctx, record)
            return record
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
            files = list(dict.fromkeys(files))
            missing = [f for f in files if not (ctx.out / f).is_file()]
            if missing:
                raise HeadpruneError(f"stage {name} did not write {missing[0]}")
            # hashed once, right after writing (the bytes are still in the page cache)
            digests = {f: file_digest(ctx.out / f) for f in files}
            record = StageRecord(name, fp, inputs, outputs, files, digests)
            timing = StageTiming(round(seconds, 3), round(cpu, 3), time.strftime("%Y-%m-%dT%H:%M:%S"))
            timing.save(self.timing(name))
            record.save(self.marker(name))
        processes.barrier()
        if not ctx.main:
            record = self._load_marker(name)
            if record is None:
                raise HeadpruneError(f"stage {name}: the main process wrote no marker")
        ctx.records[name] = record
        ctx.timings[name] = StageTiming(round(seconds, 3), round(cpu, 3), "")
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
        started = time.perf_counter()
        ctx = self.ctx
        self.check_inputs()
        lock = OutputLock(ctx.out, ctx.command) if ctx.main else None
        refused = None
        if lock is not None:
            try:
                lock.acquire()
            except HeadpruneError as error:
                refused = str(error)
        refused = processes.broadcast(refused)
        if refused is not None:
            raise HeadpruneError(refused)
        try:
            return self._run_locked(started)
        finally:
            if lock is not None:
                lock.release()

    def _run_locked(self, started: float) -> RunResult:
        from prune.pipeline.stages import STAGES

        ctx = self.ctx
        if ctx.main:
            removed = remove_leftovers(ctx.out)
            if removed:
                shown = ", ".join(str(p.relative_to(ctx.out)) for p in removed[:3])
                more = f" (+{len(removed) - 3} more)" if len(removed) > 3 else ""
                ctx.log(f"removed {len(removed)} temporary file(s) of an interrupted run: {shown}{more}")
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
        processes.barrier()  # the lock is released only when every process is done with the directory
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
