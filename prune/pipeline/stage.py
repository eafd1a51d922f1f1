"""The stage protocol: a small object that says what it reads, what it writes, and how to run.

A stage declares

- ``name``: its marker name (``stages/<name>.json``); a stage planned several times (one scoring
  stage per criterion) names each instance in :meth:`Stage.plan`;
- ``reads``: the stages whose outputs it reads (their fingerprints are part of its inputs);
- ``writes``: the files it writes, relative to the run directory (the report reads only files of
  stages that belong to the run);
- ``main_only``: run on the main process alone while the others wait (cost, export, report);
- ``section``: the recipe section that switches it on (the default :meth:`Stage.plan`);

and implements :meth:`plan` (whether and how often the recipe asks for it), :meth:`inputs` (the
JSON that is fingerprinted: the recipe sections it uses, the model, the data, upstream
fingerprints) and :meth:`run`. The runner (:mod:`prune.pipeline.runner`) does the rest:
fingerprints, skipping finished stages, barriers, markers and the "why this stage reruns" line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from prune.pipeline.artifacts import StageRecord
    from prune.pipeline.context import RunContext


@dataclass
class StageResult:
    """What a stage body returns: small JSON ``outputs`` kept in its marker, and the ``files`` it
    wrote (relative to the run directory; checked on resume)."""

    outputs: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def folder_files(ctx: RunContext, folder: str) -> list[str]:
    """Every file under ``OUT/<folder>`` (relative to the run directory, sorted): what a stage that
    saves a model directory reports as written, so each of them is verified on resume."""
    root = ctx.out / folder
    return sorted(str(p.relative_to(ctx.out)) for p in root.rglob("*") if p.is_file())


class Stage:
    """Base class of the pipeline's stages; see the module docstring."""

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    main_only: ClassVar[bool] = False
    section: ClassVar[str | None] = None  # the recipe section that switches the stage on (None: always)

    @property
    def marker_name(self) -> str:
        return self.name

    @classmethod
    def plan(cls, ctx: RunContext) -> list[Stage]:
        """The instances of this stage the recipe asks for (none, one, or one per criterion); by
        default one, when its ``section`` of the recipe is on."""
        return [cls()] if cls.section is None or getattr(ctx.recipe, cls.section) is not None else []

    def inputs(self, ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, ctx: RunContext, fingerprint: str) -> StageResult:
        raise NotImplementedError

    def valid(self, ctx: RunContext, record: StageRecord) -> bool:
        """Whether a finished run's outputs are still usable (beyond its files existing)."""
        return True

    def finished(self, ctx: RunContext, record: StageRecord) -> None:
        """Called after the stage ran or was skipped (e.g. to put its result into the context)."""
