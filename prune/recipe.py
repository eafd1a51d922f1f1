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

import csv
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from attribution.core.errors import HeadpruneError
from prune.finetune import FinetuneConfig

SPLITS = ("train", "validation", "test")
_TREE_FORMATS = ("png", "pdf", "svg", "html", "txt", "json")  # attribution.tree_render.FORMATS, without importing it
_REQUIRED = object()


class RecipeError(HeadpruneError):
    """A recipe that cannot run: the message is one line naming file, line, key and expectation."""


# --------------------------------------------------------------------------------------------
# Field helpers: constraints carry their own description of what is expected
# --------------------------------------------------------------------------------------------


def _field(default: Any = _REQUIRED, *, expect: str, check: Callable[[Any], bool] | None = None, doc: str = ""):
    """A dataclass field with validation metadata (``expect`` is shown in error messages)."""
    meta = {"expect": expect, "check": check, "doc": doc}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(value: Any) -> bool:
    return value is None or value > 0


def _non_negative(value: Any) -> bool:
    return value is None or value >= 0


def _unit_open(value: Any) -> bool:
    return value is None or 0 < value < 1


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value is None or value in choices


def _metric_name(value: Any) -> bool:
    from prune.metrics import _ALIASES, METRICS

    return _ALIASES.get(value, value) in METRICS


def _metric_expect() -> str:
    from prune.metrics import METRICS

    return "a metric name: " + ", ".join(METRICS)


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class DataSection:
    """Where the examples come from (see ``attribution.core.data.DataSpec``)."""

    name: str = _field("tweets", expect="'tweets' (embedded), a hub name[:config] or a local .csv/.json/.jsonl file")
    text_column: str | None = _field(None, expect="a column name of the data set (or null to guess)")
    text_pair_column: str | None = _field(None, expect="a column name of the data set (or null)")
    label_column: str | None = _field(None, expect="a column name of the data set (or null to guess)")
    max_length: int = _field(64, expect="an integer >= 8", check=lambda v: v >= 8)
    seed: int = _field(0, expect="an integer (seeds the split carved from data sets without one)")


@dataclass
class FinetuneSection:
    """Fine-tune ``model`` (then a base encoder) on the train split first; cached by its arguments.
    The defaults are ``prune.finetune.FinetuneConfig``'s (the data section gives ``max_length``)."""

    train_examples: int = _field(FinetuneConfig.train_examples, expect="a positive integer", check=_positive)
    epochs: int = _field(FinetuneConfig.epochs, expect="a positive integer", check=_positive)
    lr: float = _field(FinetuneConfig.lr, expect="a positive number", check=_positive)
    batch_size: int = _field(FinetuneConfig.batch_size, expect="a positive integer", check=_positive)
    seed: int = _field(FinetuneConfig.seed, expect="an integer")


@dataclass
class ScoreSection:
    """Head importance by each criterion, on ``examples`` rows of ``split``, in resumable shards."""

    criteria: dict[str, dict[str, Any]] = _field(
        {"attattr": {}, "taylor": {}, "fisher": {}, "attention": {}, "random": {}},
        expect="a mapping (or list) of criterion names to their options",
    )
    split: str = _field("validation", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(200, expect="a positive integer", check=_positive)
    batch_size: int = _field(8, expect="a positive integer", check=_positive)
    shard_size: int = _field(50, expect="a positive integer (examples per resumable shard)", check=_positive)


@dataclass
class SweepSection:
    """Prune the lowest-scored fraction of heads by each criterion (masked) and measure the metric."""

    fractions: list[float] = _field(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        expect="a list of numbers strictly between 0 and 1",
        check=lambda v: len(v) > 0,
    )
    split: str = _field("validation", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int | None = _field(500, expect="a positive integer, or null for the whole split", check=_positive)
    metric: str = _field("accuracy", expect="a metric name", check=_metric_name)
    batch_size: int = _field(64, expect="a positive integer", check=_positive)


@dataclass
class TargetSection:
    """How many heads the final model loses: exactly one of the three keys."""

    fraction: float | None = _field(None, expect="a number strictly between 0 and 1", check=_unit_open)
    keep_per_layer: int | None = _field(None, expect="a positive integer (heads kept in every layer)", check=_positive)
    max_drop: float | None = _field(
        None,
        expect="a number >= 0 (the largest swept fraction whose metric is at most this below the dense one)",
        check=_non_negative,
    )


@dataclass
class PruneSection:
    """The final pruning: which criterion's ranking, and how far."""

    criterion: str | None = _field(
        None, expect="a scored criterion's name, or 'best' (default: 'best' with a sweep, else the first scored)"
    )
    target: TargetSection = _field(
        TargetSection(max_drop=0.01), expect="a mapping with fraction, keep_per_layer or max_drop"
    )
    min_heads_per_layer: int = _field(0, expect="a non-negative integer", check=_non_negative)


@dataclass
class RepairSection:
    """Least-squares rescaling of the surviving heads (Kwon et al.) on calibration rows."""

    split: str = _field("train", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(256, expect="a positive integer", check=_positive)
    batch_size: int = _field(32, expect="a positive integer", check=_positive)


@dataclass
class EvaluateSection:
    """The metrics of the dense and the final model."""

    split: str = _field("test", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int | None = _field(None, expect="a positive integer, or null for the whole split", check=_positive)
    metrics: list[str] = _field(
        ["accuracy", "macro_f1"], expect="a non-empty list of metric names", check=lambda v: len(v) > 0
    )
    batch_size: int = _field(64, expect="a positive integer", check=_positive)


@dataclass
class CostSection:
    """Parameters, attention FLOPs, latency and file size, dense vs pruned."""

    batch_sizes: list[int] = _field([1, 32], expect="a non-empty list of positive integers", check=lambda v: len(v) > 0)
    repeats: int = _field(10, expect="a positive integer (latency = median of this many runs)", check=_positive)
    threads: int | None = _field(
        None,
        expect="a positive integer: CPU threads for timing PyTorch and ONNX Runtime alike (null: torch's default)",
        check=_positive,
    )


@dataclass
class ExportSection:
    """ONNX export of the final model, checked in onnxruntime against PyTorch."""

    onnx: bool = _field(True, expect="true or false")
    dense: bool = _field(True, expect="true or false (also export the dense model, for latency)")
    opset: int = _field(17, expect="an ONNX opset number >= 14", check=lambda v: v >= 14)
    check_examples: int = _field(32, expect="a positive integer", check=_positive)
    atol: float = _field(1e-4, expect="a positive number", check=_positive)


@dataclass
class TreeSection:
    """Attribution trees (AttAttr §4) of a few inputs, on the dense model (``headprune tree``)."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"steps": "n_steps", "method": "integration"}

    texts: list[str] = _field(expect="a non-empty list of input texts", check=lambda v: len(v) > 0)
    text_pairs: list[str] | None = _field(
        None, expect="a list of second texts, one per text (sentence-pair models), or null"
    )
    tau: float = _field(0.4, expect="a number between 0 and 1", check=lambda v: 0 <= v <= 1)
    n_steps: int = _field(20, expect="a positive integer (AttAttr quadrature nodes)", check=_positive)
    integration: str = _field("riemann_right", expect="an integration method name (AttAttr quadrature rule)")
    formats: list[str] = _field(
        ["png", "html", "txt", "json"], expect="a non-empty list of png, pdf, svg, html, txt, json",
        check=lambda v: len(v) > 0,
    )


@dataclass
class TriggersSection:
    """Trigger mining (AttAttr §5) on the dense model, optionally attacking held-out rows."""

    RENAMED: typing.ClassVar[dict[str, str]] = {"steps": "n_steps", "method": "integration"}

    split: str = _field("train", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    examples: int = _field(500, expect="a positive integer", check=_positive)
    n_steps: int = _field(20, expect="a positive integer (AttAttr quadrature nodes)", check=_positive)
    integration: str = _field("riemann_right", expect="an integration method name (AttAttr quadrature rule)")
    pairs: int = _field(2, expect="a positive integer (token pairs of the top head per example)", check=_positive)
    batch_size: int = _field(8, expect="a positive integer", check=_positive)
    attack: bool = _field(False, expect="true or false")
    top_k: int = _field(5, expect="a positive integer (patterns per class to attack with)", check=_positive)
    attack_split: str = _field("validation", expect="one of " + ", ".join(SPLITS), check=_one_of(*SPLITS))
    attack_examples: int | None = _field(
        None, expect="a positive integer, or null for the whole split", check=_positive
    )
    random_trials: int = _field(3, expect="a positive integer", check=_positive)


@dataclass
class AnalysisSection:
    """Interpretation outputs under ``OUT/analysis/``: attribution trees and/or trigger mining."""

    tree: TreeSection | None = _field(None, expect="a mapping of tree options, or null")
    triggers: TriggersSection | None = _field(None, expect="a mapping of trigger options, true or null")


@dataclass
class ReportSection:
    """The report's title (default: the recipe's name)."""

    title: str | None = _field(None, expect="a string")


@dataclass
class Recipe:
    """A validated recipe; optional sections are None when the stage is off."""

    model: str = _field(expect="a model: 'default', 'minilm', a local directory or a hub id")
    name: str | None = _field(None, expect="a string")
    output: str | None = _field(None, expect="an output directory (--out overrides it)")
    seed: int = _field(0, expect="an integer")
    data: DataSection = _field(DataSection(), expect="a mapping (data set spec)")
    finetune: FinetuneSection | None = _field(None, expect="a mapping of fine-tuning options, true or null")
    score: ScoreSection | None = _field(
        ScoreSection(), expect="a mapping (head-importance scoring), or null to skip (then no sweep/prune)"
    )
    sweep: SweepSection | None = _field(SweepSection(), expect="a mapping of sweep options, or null to skip")
    prune: PruneSection | None = _field(PruneSection(), expect="a mapping of pruning options, or null to skip")
    repair: RepairSection | None = _field(None, expect="a mapping of repair options, true or null")
    evaluate: EvaluateSection = _field(EvaluateSection(), expect="a mapping (evaluation)")
    cost: CostSection | None = _field(CostSection(), expect="a mapping of cost options, or null to skip")
    export: ExportSection | None = _field(ExportSection(), expect="a mapping of export options, or null to skip")
    analysis: AnalysisSection | None = _field(None, expect="a mapping with tree and/or triggers, or null")
    report: ReportSection = _field(ReportSection(), expect="a mapping (report options)")
    # not part of the YAML: where it came from (for messages and relative paths)
    source: str = field(default="<recipe>", repr=False, compare=False, metadata={"internal": True})

    def section(self, name: str) -> Any:
        """A section as plain JSON-able data (what stage fingerprints hash)."""
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (defaults filled in), as written to ``OUT/recipe.resolved.yaml``."""
        out = {}
        for item in dataclasses.fields(self):
            if not item.metadata.get("internal"):
                out[item.name] = self.section(item.name)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def title(self) -> str:
        return self.report.title or self.name or Path(self.source).stem


# --------------------------------------------------------------------------------------------
# Locations: path -> line, from the composed node tree
# --------------------------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


class _Locations:
    """Line numbers (1-based) of keys and values by key path; paths set by ``--set`` are marked."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.key_lines: dict[Path_, int] = {}
        self.value_lines: dict[Path_, int] = {}
        self.overridden: set[Path_] = set()

    def walk(self, node: yaml.Node | None, path: Path_ = ()) -> None:
        if node is None:
            return
        self.value_lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = ".".join(map(str, (*path, key)))
                    raise RecipeError(
                        f"{self.source}: line {line}: {where}: duplicate key (first on line {seen[key]}); "
                        "expected each key once"
                    )
                seen[key] = line
                self.key_lines[(*path, key)] = line
                self.walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, (*path, index))

    def where(self, path: Path_, *, key: bool = False) -> str:
        """``"file: line N"`` (or ``"--set"``) for the nearest located ancestor of ``path``."""
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            if any(prefix[: len(o)] == o for o in self.overridden):
                return f"{self.source} (--set {_dotted(_override_key(prefix, self.overridden))})"
            table = self.key_lines if key and cut == len(path) else self.value_lines
            line = table.get(prefix) or self.key_lines.get(prefix)
            if line is not None:
                return f"{self.source}: line {line}"
        return f"{self.source}: line 1"


def _override_key(prefix: Path_, overridden: set[Path_]) -> Path_:
    """The ``--set`` key that covers ``prefix``."""
    return next(o for o in overridden if prefix[: len(o)] == o)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Validator:
    def __init__(self, locations: _Locations) -> None:
        self.loc = locations

    def fail(self, path: Path_, problem: str, expect: str, *, key: bool = False) -> typing.NoReturn:
        name = _dotted(path) or "recipe"
        raise RecipeError(f"{self.loc.where(path, key=key)}: {name}: {problem}; expected {expect}")

    # ---- generic conversion by type annotation ------------------------------------------------

    def convert(self, value: Any, tp: Any, path: Path_, expect: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if value is None:
                if type(None) in args:
                    return None
                self.fail(path, "got null", expect)
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                if value is False:
                    return None  # an optional stage switched off
                if value is True:
                    value = {}
            return self.convert(value, inner[0], path, expect)
        if dataclasses.is_dataclass(tp):
            return self.section(value, tp, path, expect)
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(path, f"got {_describe(value)}", expect)
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"got {_describe(value)}", expect)
            return value
        if tp is float:
            if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    self.fail(path, f"got {_describe(value)}", expect)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"got {_describe(value)}", expect)
            return float(value)
        if tp is str:
            if not isinstance(value, str) or not value.strip():
                self.fail(path, f"got {_describe(value) if value != '' else 'an empty string'}", expect)
            return value
        if origin is list:
            if not isinstance(value, list):
                self.fail(path, f"got {_describe(value)}", expect)
            return [self.convert(v, args[0], (*path, i), expect) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(path, f"got {_describe(value)}", expect)
            return {str(k): self.convert(v, args[1], (*path, str(k)), expect) for k, v in value.items()}
        raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not in the recipe

    def section(self, value: Any, cls: type, path: Path_, expect: str) -> Any:
        if not isinstance(value, dict):
            self.fail(path, f"got {_describe(value)}", expect)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        renamed = getattr(cls, "RENAMED", {})  # old key -> new key: say so instead of "unknown key"
        for key in value:
            if key in renamed:
                new = renamed[key]
                self.fail((*path, str(key)), f"renamed to {new}", f"{new}: {fields[new].metadata['expect']}", key=True)
            if key not in fields:
                known = ", ".join(fields)
                self.fail((*path, str(key)), "unknown key", f"one of: {known}", key=True)
        kwargs = {}
        for name, item in fields.items():
            sub = (*path, name)
            if name not in value:
                if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                    where = _dotted(path) or "the recipe"
                    raise RecipeError(
                        f"{self.loc.where(path)}: missing required key {_dotted(sub)!r} in {where}; "
                        f"expected {item.metadata['expect']}"
                    )
                continue
            if name == "criteria" and cls is ScoreSection:
                kwargs[name] = self.criteria(value[name], sub)
                continue
            converted = self.convert(value[name], hints[name], sub, item.metadata["expect"])
            check = item.metadata.get("check")
            if check is not None and converted is not None:
                items = converted if isinstance(converted, list) and name != "fractions" else [converted]
                if name == "fractions":
                    if not check(converted):
                        self.fail(sub, "got an empty list", item.metadata["expect"])
                    for i, fraction in enumerate(converted):
                        if not _unit_open(fraction):
                            self.fail((*sub, i), f"got {_describe(fraction)}", "a number strictly between 0 and 1")
                elif isinstance(converted, list):
                    if not check(converted):
                        self.fail(sub, "got an empty list", item.metadata["expect"])
                    self.list_items(converted, name, sub)
                else:
                    for single in items:
                        if not check(single):
                            self.fail(sub, f"got {_describe(single)}", item.metadata["expect"])
            kwargs[name] = converted
        return cls(**kwargs)

    def list_items(self, values: list[Any], name: str, path: Path_) -> None:
        for i, item in enumerate(values):
            if name == "metrics" and not _metric_name(item):
                self.fail((*path, i), f"unknown metric {item!r}", _metric_expect())
            if name == "batch_sizes" and item < 1:
                self.fail((*path, i), f"got {_describe(item)}", "a positive integer")
            if name == "formats" and str(item).lower().lstrip(".") not in _TREE_FORMATS:
                self.fail((*path, i), f"unknown format {item!r}", "one of: " + ", ".join(_TREE_FORMATS))

    # ---- criteria: names from the registry, options from the constructor's signature ----------

    def criteria(self, value: Any, path: Path_) -> dict[str, dict[str, Any]]:
        from attribution.criteria import CRITERIA

        expect = "a mapping (or list) of criterion names to their options"
        if isinstance(value, list):
            for i, name in enumerate(value):
                if not isinstance(name, str):
                    self.fail((*path, i), f"got {_describe(name)}", "a criterion name: " + ", ".join(CRITERIA))
            value = {name: {} for name in value}
        if not isinstance(value, dict):
            self.fail(path, f"got {_describe(value)}", expect)
        if not value:
            self.fail(path, "got no criteria", "at least one of: " + ", ".join(CRITERIA))
        out: dict[str, dict[str, Any]] = {}
        for name, options in value.items():
            sub = (*path, str(name))
            if name not in CRITERIA:
                self.fail(sub, f"unknown criterion {name!r}", "one of: " + ", ".join(CRITERIA), key=True)
            options = {} if options is None else options
            if not isinstance(options, dict):
                self.fail(sub, f"got {_describe(options)}", f"a mapping of {name} options (or null)")
            out[name] = self.criterion_options(name, CRITERIA[name], options, sub)
        return out

    def criterion_options(self, name: str, cls: Any, options: dict[str, Any], path: Path_) -> dict[str, Any]:
        """Options checked by the criterion's own ``option_spec`` (names, types, choices), then by
        constructing it (checks across options); errors point at the option."""
        from attribution.criteria import CriterionOptionError

        spec = cls.option_spec()
        described = ", ".join(f"{key} (default {_describe(o.default)})" for key, o in spec.items()) or "none"
        for key, value in options.items():
            sub = (*path, str(key))
            if key not in spec:
                renamed = cls.RENAMED.get(key)
                if renamed is not None:
                    self.fail(sub, f"renamed to {renamed}", f"{renamed}: {spec[renamed].expect}", key=True)
                self.fail(sub, f"unknown option of {name}", f"one of its options: {described}", key=True)
            if spec[key].problem(value) is not None:
                self.fail(sub, f"got {_describe(value)}", spec[key].expect)
        try:
            cls(**options)
        except CriterionOptionError as error:
            where = (*path, error.option) if error.option in options else path
            self.fail(where, error.problem, error.expect or f"valid {name} options")
        except (HeadpruneError, TypeError, ValueError) as error:
            self.fail(path, str(error).splitlines()[0], f"valid {name} options")
        return dict(options)


# --------------------------------------------------------------------------------------------
# Cross-section rules and checks against the file system
# --------------------------------------------------------------------------------------------


def _cross_checks(recipe: Recipe, v: _Validator) -> None:
    if recipe.score is None:
        for name in ("sweep", "prune"):
            if getattr(recipe, name) is not None:
                v.fail((name,), f"{name} needs the score section, which is off", "null (or a score section)")
    if recipe.analysis is not None:
        _analysis_checks(recipe.analysis, v)
    target = recipe.prune.target if recipe.prune else None
    if recipe.prune is not None:
        chosen = [k for k in ("fraction", "keep_per_layer", "max_drop") if getattr(target, k) is not None]
        if len(chosen) != 1:
            got = "none of them" if not chosen else " and ".join(chosen)
            v.fail(("prune", "target"), f"got {got}", "exactly one of fraction, keep_per_layer, max_drop")
        if target.max_drop is not None and recipe.sweep is None:
            v.fail(("prune", "target", "max_drop"), "max_drop needs the sweep, which is off", "a sweep section")
        if recipe.prune.criterion is None:
            recipe.prune.criterion = "best" if recipe.sweep is not None else next(iter(recipe.score.criteria))
        criterion = recipe.prune.criterion
        if criterion == "best":
            if recipe.sweep is None:
                v.fail(("prune", "criterion"), "'best' needs the sweep, which is off", "a scored criterion's name")
        elif criterion not in recipe.score.criteria:
            v.fail(
                ("prune", "criterion"),
                f"{criterion!r} is not scored",
                "one of the score.criteria (" + ", ".join(recipe.score.criteria) + ") or 'best'",
            )
    if recipe.repair is not None and recipe.prune is None:
        v.fail(("repair",), "repair needs the prune section, which is off", "null (or a prune section)")
    if recipe.export is not None and recipe.export.onnx and recipe.prune is None and not recipe.export.dense:
        v.fail(("export",), "nothing to export (no prune section, dense: false)", "a prune section or dense: true")
    if recipe.data.text_pair_column is not None and recipe.data.text_column is None:
        v.fail(("data", "text_pair_column"), "set without text_column", "text_column as well")


def _analysis_checks(analysis: AnalysisSection, v: _Validator) -> None:
    from attribution.quadrature import INTEGRATIONS

    for name in ("tree", "triggers"):
        section = getattr(analysis, name)
        if section is None:
            continue
        if section.integration not in INTEGRATIONS:
            v.fail(("analysis", name, "integration"), f"unknown integration method {section.integration!r}",
                   "one of: " + ", ".join(INTEGRATIONS))
        if section.integration == "riemann_trapezoid" and section.n_steps < 2:
            v.fail(("analysis", name, "n_steps"), f"got {section.n_steps}", "an integer >= 2 for riemann_trapezoid")
    tree = analysis.tree
    if tree is not None and tree.text_pairs is not None and len(tree.text_pairs) != len(tree.texts):
        v.fail(("analysis", "tree", "text_pairs"), f"got {len(tree.text_pairs)} for {len(tree.texts)} texts",
               "one second text per text")
    if analysis.tree is None and analysis.triggers is None:
        v.fail(("analysis",), "neither tree nor triggers", "a tree and/or a triggers section (or analysis: null)")


def _resolve_relative(recipe: Recipe, base: Path) -> None:
    """Local paths in ``model`` and ``data.name`` are relative to the recipe file's directory."""
    for owner, attr in ((recipe, "model"), (recipe.data, "name")):
        value = getattr(owner, attr)
        if value in ("default", "minilm", "tweets") or os.path.isabs(value) or value.startswith("~"):
            continue
        candidate = base / value
        if candidate.exists():
            setattr(owner, attr, str(candidate.resolve()))


def _check_paths(recipe: Recipe, v: _Validator) -> None:
    model = recipe.model
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        v.fail(("model",), f"directory not found: {model}", "'default', 'minilm', a local directory or a hub id")
    if Path(model).expanduser().is_dir() and not (Path(model).expanduser() / "config.json").is_file():
        v.fail(("model",), f"{model} has no config.json", "a model directory (config.json and weights)")
    name = recipe.data.name
    suffix = Path(name).suffix.lower()
    if suffix in (".csv", ".tsv", ".json", ".jsonl"):
        path = Path(name).expanduser()
        if not path.is_file():
            v.fail(("data", "name"), f"file not found: {name}", "an existing data file or a data set name")
        columns = _file_columns(path)
        if columns is None:
            return
        for key in ("text_column", "text_pair_column", "label_column"):
            column = getattr(recipe.data, key)
            if column is not None and column not in columns:
                v.fail(
                    ("data", key),
                    f"column {column!r} not in {path.name}",
                    "one of its columns: " + ", ".join(columns),
                )


def _file_columns(path: Path) -> list[str] | None:
    """Column names of a local data file from its first line (None when they cannot be read cheaply)."""
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            for encoding in ("utf-8", "latin-1"):
                try:
                    with open(path, newline="", encoding=encoding) as handle:
                        return next(csv.reader(handle, delimiter=delimiter), [])
                except UnicodeDecodeError:
                    continue
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                first = json.loads(handle.readline() or "{}")
            return list(first) if isinstance(first, dict) else None
    except (OSError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (``["a", "b", "c"]``, value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected key.path=value, e.g. --set score.examples=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
    return key.split("."), value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}  # e.g. `repair: true` then --set repair.examples=64
            node[key] = child
        node = child
    node[keys[-1]] = value


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return str(problem)


def parse_recipe(
    text: str, source: str = "<recipe>", overrides: Sequence[str] = (), base_dir: Path | None = None
) -> Recipe:
    """Validate recipe text (plus ``key.path=value`` overrides) into a :class:`Recipe`.

    Raises:
        RecipeError: one line, ``"SOURCE: line N: key.path: problem; expected ..."``.
    """
    locations = _Locations(source)
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "line 1"
        raise RecipeError(f"{source}: {line}: invalid YAML: {_yaml_problem(error)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: line 1: recipe: got {_describe(data)}; expected a mapping of sections")
    locations.walk(node)
    for text_override in overrides:
        keys, value = parse_override(text_override)
        _apply_override(data, keys, value)
        locations.overridden.add(tuple(keys))
    validator = _Validator(locations)
    recipe = validator.section(data, Recipe, (), "a mapping of sections")
    recipe.source = source
    _resolve_relative(recipe, base_dir or Path.cwd())
    _cross_checks(recipe, validator)
    _check_paths(recipe, validator)
    return recipe


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file; relative paths inside resolve against its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from None
    return parse_recipe(text, str(path), overrides, base_dir=path.resolve().parent)


def describe_schema() -> str:
    """Every key with its default and what it expects (``headprune validate --schema``)."""
    lines: list[str] = []

    def walk(cls: type, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if item.metadata.get("internal"):
                continue
            tp = hints[item.name]
            inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            else:
                default = "(required)"
            if sub is not None:
                state = "" if default is not None else "  # off unless given"
                lines.append(f"{indent}{item.name}:{state}  # {item.metadata['expect']}")
                walk(sub, indent + "  ")
            else:
                shown = json.dumps(default) if default != "(required)" else default
                lines.append(f"{indent}{item.name}: {shown}  # {item.metadata['expect']}")

    walk(Recipe, "")
    return "\n".join(lines)
