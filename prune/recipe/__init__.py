"""Recipes: the whole pipeline as one YAML file, validated before anything runs.

A recipe names a model, a data set and what to do with them: an optional fine-tune, which
head-importance criteria to score with, a pruning sweep, a final pruning target, an optional
repair, evaluation, cost measurement, export and the report. :func:`load_recipe` parses it into a
typed :class:`Recipe` (every default filled in) or raises :class:`RecipeError` with one line that
names the file, the line, the key path, what was found and what was expected, e.g.::

    recipes/mine.yaml: line 14: sweep.fractions[2]: got 1.5; expected a number strictly between 0 and 1

``--set key.path=value`` overrides (``overrides=`` here) are applied before validation; their
values are parsed as YAML (``--set sweep.fractions=[0.2,0.4]``), and errors in them say
``--set`` instead of a line number.

Line numbers come from ``yaml.compose`` (the node tree keeps each node's start mark); the loaded
values are checked against the section dataclasses below, whose field metadata carries the
constraint and the human description of what is expected.
"""

from __future__ import annotations

from prune.recipe.parse import load_recipe, parse_override, parse_recipe
from prune.recipe.schema import (
    SPLITS,
    AnalysisSection,
    CostSection,
    DataSection,
    EvaluateSection,
    ExportSection,
    FinetuneSection,
    PruneSection,
    Recipe,
    RecipeError,
    RepairSection,
    ReportSection,
    ScoreSection,
    SweepSection,
    TargetSection,
    TreeSection,
    TriggersSection,
    describe_schema,
)

__all__ = [
    "SPLITS",
    "AnalysisSection",
    "CostSection",
    "DataSection",
    "EvaluateSection",
    "ExportSection",
    "FinetuneSection",
    "PruneSection",
    "Recipe",
    "RecipeError",
    "RepairSection",
    "ReportSection",
    "ScoreSection",
    "SweepSection",
    "TargetSection",
    "TreeSection",
    "TriggersSection",
    "describe_schema",
    "load_recipe",
    "parse_override",
    "parse_recipe",
]
