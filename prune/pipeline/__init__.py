"""Recipes run as resumable stages: the runner, the stages (one module each), the typed run files.

``run_recipe(recipe, out_dir)`` is the entry point; see :mod:`prune.pipeline.runner`.
"""

from __future__ import annotations

from prune.pipeline.runner import RunResult, StageOutcome, run_recipe

__all__ = ["RunResult", "StageOutcome", "run_recipe"]
